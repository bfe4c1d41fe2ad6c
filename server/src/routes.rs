//! The HTTP routes and their handlers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::api::{Endpoint, RequestBody, RequestLimits};
use crate::error::ApiError;
use crate::job::{Event, Job, Place};
use crate::metrics::Metrics;
use crate::reply::{self, Header};

/// What every handler shares.
pub(crate) struct AppState {
    /// The model's name in requests and replies.
    pub model: String,
    pub api_key: Option<String>,
    pub limits: RequestLimits,
    /// Requests in the batch plus those waiting.
    pub max_in_flight: usize,
    pub max_body_bytes: usize,
    /// Time a request's body may take to arrive.
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// To the engine thread.
    pub jobs: mpsc::Sender<Job>,
    pub next_id: AtomicU64,
}

/// The server's routes over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn no_route() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match s.authorize(&headers) {
        Ok(()) => Json(s.metrics.snapshot()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match s.authorize(&headers) {
        Ok(()) => Json(json!({"object": "list", "data": [s.model_object()]})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let found = s
        .authorize(&headers)
        .and_then(|()| s.check_model(Some(&id)));
    match found {
        Ok(()) => Json(s.model_object()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A request's body, read within the server's body timeout and size limit.
struct TimedBody(Bytes);

impl FromRequest<Arc<AppState>> for TimedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let read = Bytes::from_request(request, state);
        match tokio::time::timeout(state.body_timeout, read).await {
            Ok(body) => body.map(TimedBody).map_err(body_error),
            Err(_) => Err(ApiError::timeout(format!(
                "the request body did not arrive within {} s",
                state.body_timeout.as_secs_f64()
            ))),
        }
    }
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<TimedBody, ApiError>,
) -> Response {
    s.complete(Endpoint::Chat, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<TimedBody, ApiError>,
) -> Response {
    s.complete(Endpoint::Completion, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

impl AppState {
    /// Checks the bearer key, when the server has one.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if same_bytes(g.as_bytes(), key.as_bytes()) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }

    fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        match asked {
            Some(m) if m != self.model => Err(ApiError::not_found(
                "model_not_found",
                format!(
                    "model '{m}' is not served here (this server has '{}')",
                    self.model
                ),
            )),
            _ => Ok(()),
        }
    }

    fn model_object(&self) -> serde_json::Value {
        json!({"id": self.model, "object": "model", "created": 0, "owned_by": "tandem"})
    }

    /// Checks a completion request, hands it to the engine thread and
    /// replies as it asks (whole or streamed).
    async fn complete(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Result<TimedBody, ApiError>,
    ) -> Result<Response, ApiError> {
        self.authorize(headers)?;
        let TimedBody(body) = body?;
        let parsed = RequestBody::parse(&body)?;
        self.check_model(parsed.model())?;
        let request = parsed.check(endpoint, self.limits)?;
        let place = Place::take(&self.metrics, self.max_in_flight).ok_or_else(|| {
            ApiError::overloaded(format!(
                "{} requests are in flight, the most this server takes; retry later",
                self.max_in_flight
            ))
        })?;
        let header = self.header(endpoint);
        let (events, mut replies) = unbounded_channel();
        let job = Job {
            id: header.id.clone(),
            prompt: request.prompt,
            max_tokens: request.max_tokens,
            sampling: request.sampling,
            stop: request.stop,
            events,
            _place: place,
        };
        self.send(job)?;
        let prompt_tokens = match replies.recv().await {
            Some(Event::Started { prompt_tokens }) => prompt_tokens,
            Some(Event::Failed(e)) => return Err(e),
            _ => return Err(ApiError::internal("the engine stopped")),
        };
        if request.stream {
            return Ok(reply::streamed(
                header,
                prompt_tokens,
                request.include_usage,
                replies,
            ));
        }
        let whole = reply::whole(header, prompt_tokens, replies).await?;
        Ok((StatusCode::OK, Json(whole)).into_response())
    }

    fn send(&self, job: Job) -> Result<(), ApiError> {
        self.jobs
            .send(job)
            .map_err(|_| ApiError::internal("the engine stopped"))
    }

    fn header(&self, endpoint: Endpoint) -> Header {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Header {
            id: format!("{prefix}-{n}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: self.model.clone(),
            endpoint,
        }
    }
}

/// A body that could not be read: too long (413) or broken (400).
fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::too_long("body_too_large", rejection.body_text());
    }
    ApiError::bad_request(rejection.body_text())
}

/// Equality whose time does not depend on where the keys differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
