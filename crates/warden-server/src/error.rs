//! The one error type of the HTTP edge. Status codes are chosen here and nowhere else.

use axum::http::StatusCode;
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
        (self.status(), Json(body)).into_response()
    }
}
