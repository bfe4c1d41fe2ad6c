//! `tandem serve`: loads the model and hands it to the HTTP server.

use std::time::Duration;

use anyhow::Result;
use tandem_gpu::DenseDevice;
use tandem_server::ServerOptions;

use crate::{DeviceTask, ServeArgs};

/// The environment variable holding the API key when `--api-key` is not given.
const API_KEY_VAR: &str = "TANDEM_API_KEY";

pub(crate) fn serve<D: DenseDevice + 'static>(args: &ServeArgs, device: D) -> Result<()> {
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var(API_KEY_VAR).ok())
        .filter(|k| !k.is_empty());
    let options = ServerOptions {
        host: args.host.clone(),
        port: args.port,
        api_key,
        max_sequences: args.max_sequences,
        max_queue: args.max_queue,
        default_max_tokens: args.max_tokens,
        max_tokens_limit: args.max_tokens_limit,
        max_context: args.max_context,
        max_connections: args.max_connections as usize,
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        ..ServerOptions::default()
    };
    let engine = args.model.load(device)?;
    tandem_server::serve(engine, &options)?;
    Ok(())
}

/// `tandem serve` as a task for the device `--device` selects.
pub(crate) struct Serve<'a>(pub &'a ServeArgs);

impl DeviceTask for Serve<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        serve(self.0, device)
    }
}
