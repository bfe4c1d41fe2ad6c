//! tandem's OpenAI-compatible HTTP server.
//!
//! One engine thread owns the model and steps every conversation in flight
//! together (a new request's prompt is prefilled a chunk at a time between
//! decode steps, then it joins the batch); the HTTP layer (axum on a single-threaded tokio
//! runtime) parses requests, checks the bearer key and streams each reply
//! from its channel. A client that goes away drops its channel, and the
//! engine thread frees its sequence at the next step. Connections are
//! capped in number, and a client slow to send its headers or its body is
//! cut off.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `"stream": true` for server-sent events), `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health` (never asks for the key) and
//! `GET /metrics` (request counters as JSON).

#![forbid(unsafe_code)]

mod api;
mod connections;
mod error;
mod job;
mod metrics;
mod options;
mod prefill;
mod reply;
mod routes;
mod scheduler;
mod sequence;
mod server;
mod stop;

pub use error::ServeError;
pub use options::ServerOptions;
pub use server::serve;
