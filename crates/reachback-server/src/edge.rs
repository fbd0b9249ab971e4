//! The edge check every request passes before any handler: each path segment,
//! each query parameter (name and value) and each header the API reads must be
//! UTF-8 without control characters once percent-decoded. Anything else is a 400
//! problem document naming the parameter, and never reaches a handler or SQL (a
//! NUL in an id was a 500 on PostgreSQL). Bodies are checked field by field where
//! they are read (`request.rs`).

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, FieldError};

/// The headers the API reads (the rest pass through to nobody).
const READ_HEADERS: &[&str] =
    &["authorization", "cookie", "host", "content-type", "x-csrf-token", "x-forwarded-proto", "x-reachback-signature", "x-reachback-timestamp"];

/// Why a decoded value is refused, if it is.
fn flaw(bytes: &[u8]) -> Option<&'static str> {
    match std::str::from_utf8(bytes) {
        Err(_) => Some("is not valid UTF-8"),
        Ok(text) if text.chars().any(char::is_control) => Some("may not contain control characters"),
        Ok(_) => None,
    }
}

/// Percent-decodes a path segment or a query component (`+` is a space in a query).
fn decode(text: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = |byte: u8| (byte as char).to_digit(16);
                match (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                    (Some(high), Some(low)) => {
                        decoded.push((high * 16 + low) as u8);
                        index += 3;
                        continue;
                    }
                    _ => decoded.push(b'%'),
                }
            }
            b'+' if plus_is_space => decoded.push(b' '),
            byte => decoded.push(byte),
        }
        index += 1;
    }
    decoded
}

/// The first flaw of a request's path, query and read headers: (parameter, message).
pub fn check(path: &str, template: Option<&str>, query: Option<&str>, headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    let names: Vec<&str> = template.map(|template| template.split('/').collect()).unwrap_or_default();
    for (position, segment) in path.split('/').enumerate() {
        if let Some(problem) = flaw(&decode(segment, false)) {
            // the route's name for the segment (`id`), or its position
            let name = match names.get(position) {
                Some(name) if name.starts_with('{') => name.trim_matches(|c| c == '{' || c == '}').to_string(),
                _ => format!("path segment {position}"),
            };
            return Some((name, problem.to_string()));
        }
    }
    for pair in query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key_bytes = decode(key, true);
        if let Some(problem) = flaw(&key_bytes) {
            return Some(("query parameter name".to_string(), problem.to_string()));
        }
        if let Some(problem) = flaw(&decode(value, true)) {
            return Some((String::from_utf8_lossy(&key_bytes).into_owned(), problem.to_string()));
        }
    }
    for name in READ_HEADERS {
        for value in headers.get_all(*name) {
            if let Some(problem) = flaw(value.as_bytes()) {
                return Some((format!("header {name}"), problem.to_string()));
            }
        }
    }
    None
}

/// The middleware: refuses a request whose path, query or read headers have a flaw.
pub async fn guard(request: Request, next: Next) -> Response {
    let template = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_string());
    if let Some((parameter, message)) = check(request.uri().path(), template.as_deref(), request.uri().query(), request.headers()) {
        let mut error = ApiError::bad_request(format!("{parameter} {message}"));
        error.errors.push(FieldError { field: parameter, message: message.clone() });
        return error.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_flaw(path: &str, template: &str) -> Option<(String, String)> {
        check(path, Some(template), None, &axum::http::HeaderMap::new())
    }

    #[test]
    fn control_characters_and_bad_utf8_are_named_by_their_parameter() {
        assert_eq!(path_flaw("/api/v1/ip-ranges/abc", "/api/v1/ip-ranges/{id}"), None);
        assert_eq!(path_flaw("/api/v1/ip-ranges/a%00b", "/api/v1/ip-ranges/{id}"), Some(("id".into(), "may not contain control characters".into())));
        assert_eq!(path_flaw("/api/v1/ip-ranges/%FF", "/api/v1/ip-ranges/{id}"), Some(("id".into(), "is not valid UTF-8".into())));
        assert_eq!(
            path_flaw("/api/v1/ip-ranges/%E2%80%8Bx", "/api/v1/ip-ranges/{id}"),
            None,
            "a zero-width space is no control character (names refuse it elsewhere)"
        );
        assert_eq!(path_flaw("/api/v1/ip-ranges/%7F", "/api/v1/ip-ranges/{id}"), Some(("id".into(), "may not contain control characters".into())));
        assert_eq!(path_flaw("/api/v1/ip-ranges/Caf%C3%A9", "/api/v1/ip-ranges/{id}"), None);
        let headers = axum::http::HeaderMap::new();
        assert_eq!(check("/x", None, Some("name=a%00b"), &headers), Some(("name".into(), "may not contain control characters".into())));
        assert_eq!(check("/x", None, Some("name=%C0%80"), &headers), Some(("name".into(), "is not valid UTF-8".into())), "an overlong NUL");
        assert_eq!(check("/x", None, Some("na%01me=x"), &headers), Some(("query parameter name".into(), "may not contain control characters".into())));
        assert_eq!(check("/x", None, Some("name=Paris+laptops&sort=-name"), &headers), None);
        assert_eq!(check("/x", None, Some("name=100%"), &headers), None, "a lone % is text");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("authorization", axum::http::HeaderValue::from_bytes(b"Bearer \xff").expect("obs-text is a valid header byte"));
        assert_eq!(check("/x", None, None, &headers), Some(("header authorization".into(), "is not valid UTF-8".into())));
    }

    #[test]
    fn decoding_never_panics() {
        for text in ["%", "%%", "%4", "%zz", "a%", "%%41", "+", "%2"] {
            let _ = decode(text, true);
            let _ = decode(text, false);
        }
        assert_eq!(decode("%41%42+c", true), b"AB c");
        assert_eq!(decode("%41%42+c", false), b"AB+c");
        assert_eq!(decode("%4", false), b"%4");
    }
}
