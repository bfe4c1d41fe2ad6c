//! Starting the server: the listening socket, the engine thread and the
//! HTTP runtime, until Ctrl-C.

use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};

use tandem_gpu::DenseDevice;
use tandem_runtime::Engine;

use crate::api::RequestLimits;
use crate::connections::{self, ConnectionLimits};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::options::ServerOptions;
use crate::routes::{router, AppState};
use crate::scheduler::{self, Limits};

/// Serves `engine` over HTTP as `options` say, until Ctrl-C (then the
/// requests in flight finish first). Logs the bound address and each
/// request's end to stderr.
pub fn serve<D: DenseDevice + 'static>(
    engine: Engine<D>,
    options: &ServerOptions,
) -> Result<(), ServeError> {
    let limits = check(&engine, options)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| io("the async runtime", source))?;
    let listener = runtime.block_on(bind(options))?;
    let addr = listener
        .local_addr()
        .map_err(|source| io("the listening socket", source))?;
    let metrics = Arc::new(Metrics::default());
    let (jobs, received) = mpsc::channel();
    let state = Arc::new(AppState {
        model: model_name(&engine),
        api_key: options.api_key.clone(),
        limits: RequestLimits {
            max_tokens_limit: options.max_tokens_limit,
        },
        max_in_flight: options.max_sequences + options.max_queue,
        max_body_bytes: options.max_body_bytes,
        body_timeout: options.body_timeout,
        metrics: Arc::clone(&metrics),
        jobs,
        next_id: AtomicU64::new(1),
    });
    let engine_thread = std::thread::Builder::new()
        .name("tandem-engine".into())
        .spawn(move || scheduler::run(&engine, limits, metrics, received))
        .map_err(|e| ServeError::Engine(e.to_string()))?;
    eprintln!("tandem serve: listening on http://{addr}");
    let app = router(state);
    let connection_limits = ConnectionLimits {
        max_connections: options.max_connections,
        header_timeout: options.header_timeout,
    };
    runtime.block_on(connections::serve(
        listener,
        app,
        connection_limits,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    ));
    // The router (and with it the jobs channel) is gone: the engine thread
    // ends once its last sequence does.
    engine_thread
        .join()
        .map_err(|_| ServeError::Engine("it panicked".into()))
}

/// The limits the engine thread applies, checked against the model.
fn check<D: DenseDevice>(
    engine: &Engine<D>,
    options: &ServerOptions,
) -> Result<Limits, ServeError> {
    let engine_context = engine.context_limit();
    let context = options.max_context.unwrap_or(engine_context);
    if context < 2 || context > engine_context {
        return Err(ServeError::Options(format!(
            "the context limit must be between 2 and the engine's {engine_context} tokens, got {context}"
        )));
    }
    if options.max_sequences == 0 || options.default_max_tokens == 0 {
        return Err(ServeError::Options(
            "the batch size and the default max tokens must be at least 1".into(),
        ));
    }
    if options.max_connections == 0 {
        return Err(ServeError::Options(
            "the connection limit must be at least 1".into(),
        ));
    }
    if options.header_timeout.is_zero() || options.body_timeout.is_zero() {
        return Err(ServeError::Options(
            "the header and body timeouts must be above zero".into(),
        ));
    }
    if options.default_max_tokens > options.max_tokens_limit {
        return Err(ServeError::Options(format!(
            "the default max tokens ({}) exceeds the limit ({})",
            options.default_max_tokens, options.max_tokens_limit
        )));
    }
    Ok(Limits {
        max_sequences: options.max_sequences,
        context,
        default_max_tokens: options.default_max_tokens,
    })
}

async fn bind(options: &ServerOptions) -> Result<tokio::net::TcpListener, ServeError> {
    let target = (options.host.as_str(), options.port);
    tokio::net::TcpListener::bind(target)
        .await
        .map_err(|source| {
            io(
                &format!("listening on {}:{}", options.host, options.port),
                source,
            )
        })
}

/// The model's name in the API: its file name without the extension.
fn model_name<D: DenseDevice>(engine: &Engine<D>) -> String {
    let path = engine.path();
    path.file_stem().or_else(|| path.file_name()).map_or_else(
        || "tandem".to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn io(context: &str, source: std::io::Error) -> ServeError {
    ServeError::Io {
        context: context.to_string(),
        source,
    }
}
