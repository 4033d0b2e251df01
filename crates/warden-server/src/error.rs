//! The one error type of the HTTP edge. Status codes are chosen here and nowhere else.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Unprocessable {
        message: String,
        problems: Vec<String>,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("the request was not read and answered within the request timeout of {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("request body must be `application/json`, not `{0}`")]
    UnsupportedMediaType(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BAD_REQUEST",
            ApiError::TooLarge(_) => "PAYLOAD_TOO_LARGE",
            ApiError::Unauthorized(_) => "UNAUTHORIZED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::Conflict(_) => "CONFLICT",
            ApiError::Unprocessable { .. } => "UNPROCESSABLE",
            ApiError::Unavailable(_) => "UNAVAILABLE",
            ApiError::RequestTimeout(_) => "REQUEST_TIMEOUT",
            ApiError::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
        }
    }
}

impl From<warden_core::store::StoreError> for ApiError {
    fn from(e: warden_core::store::StoreError) -> Self {
        match e {
            warden_core::store::StoreError::Conflict(m) => ApiError::Conflict(m),
            warden_core::store::StoreError::NotFound(m) => ApiError::NotFound(m),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code(), "message": self.to_string() });
        if let ApiError::Unprocessable { problems, .. } = &self {
            body["problems"] = json!(problems);
        }
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::TooLarge(_)) {
            // The rest of the body was never read, so the connection cannot carry
            // another request.
            close_connection(&mut resp);
        }
        resp
    }
}

/// Whether a request announces a body (a non-zero length, or chunks).
pub fn declares_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

/// Marks a response as the last on its connection. Used when a request is refused
/// before its body was read: the unread bytes would be taken for the next request, so
/// the server closes the connection, and says so, so that the client does not send its
/// next request into a socket about to close.
pub fn close_connection(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Refuses a POST whose body is not declared `application/json` (415) before it is read.
/// A web page can send a cross-origin POST without a preflight only as `text/plain`,
/// form data or multipart; requiring JSON takes that way in from every page a user of
/// the node's network opens. A POST without a body needs no type.
pub async fn require_json(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && declares_body(req.headers()) {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let essence = ct
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(|e| e.trim().to_ascii_lowercase());
        if essence.as_deref() != Some("application/json") {
            let shown: String = ct
                .unwrap_or_else(|| "nothing".to_owned())
                .chars()
                .take(100)
                .collect();
            let mut resp = ApiError::UnsupportedMediaType(shown).into_response();
            close_connection(&mut resp);
            return resp;
        }
    }
    next.run(req).await
}
