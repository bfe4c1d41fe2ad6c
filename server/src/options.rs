//! What a server is configured with.

use std::time::Duration;

/// Limits and addresses of a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port to listen on (0: any free port; the bound address is logged).
    pub port: u16,
    /// When set, every `/v1/` route and `/metrics` ask for `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Sequences decoded together in one batch.
    pub max_sequences: usize,
    /// Requests waiting for a place in the batch; more are refused with 503.
    pub max_queue: usize,
    /// Tokens generated for a request that names no `max_tokens`.
    pub default_max_tokens: usize,
    /// The most tokens a request may ask for.
    pub max_tokens_limit: usize,
    /// Prompt plus reply tokens of one request (`None`: the model's context).
    pub max_context: Option<usize>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Connections served at once; further ones wait until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (counted from the
    /// connection's start or its previous reply); then the connection closes.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in;
    /// then it gets 408 and the connection closes.
    pub body_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_sequences: 8,
            max_queue: 32,
            default_max_tokens: 256,
            max_tokens_limit: 4096,
            max_context: None,
            max_body_bytes: 4 << 20,
            max_connections: 128,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
        }
    }
}
