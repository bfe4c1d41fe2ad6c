//! Errors: the server's own (start-up), and the API's (one HTTP reply each).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The listening socket or the runtime failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The engine thread could not be started.
    #[error("the engine thread: {0}")]
    Engine(String),
}

/// An error reply in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            code,
        }
    }

    /// 400: the request is malformed or asks for something out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            m,
        )
    }

    /// 401: missing or wrong bearer key.
    pub fn unauthorized() -> Self {
        let m = "missing or invalid API key (Authorization: Bearer KEY)".to_string();
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            m,
        )
    }

    /// 404: no such route or model.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            code,
            message.into(),
        )
    }

    /// 400 `context_length_exceeded`: the prompt and the reply asked for do
    /// not fit in the context (OpenAI's status and code).
    pub fn context_exceeded(message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "context_length_exceeded",
            m,
        )
    }

    /// 408: the request's body did not arrive in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            m,
        )
    }

    /// 413: the body is too long.
    pub fn too_long(code: &'static str, message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            code,
            m,
        )
    }

    /// 503: every place in the batch and the queue is taken.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "overloaded",
            m,
        )
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> Self {
        let m = message.into();
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            m,
        )
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "code": self.code}
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
