//! tandem's runtime: models, tokenizer, chat templates, sessions and the decode step.
//!
//! ```no_run
//! use tandem_runtime::{Engine, EngineOptions, Flow, SamplingConfig};
//! use tandem_runtime::chat::Message;
//!
//! let engine = Engine::load(&tandem_runtime::default_model_path(), &EngineOptions::default())?;
//! let prompt = engine.render_chat(&[Message::user("What is the capital of France?")])?;
//! let ids = engine.tokenizer().encode(&prompt, false)?;
//! let mut session = engine.session()?;
//! session.generate(&ids, 32, &SamplingConfig::default(), None, &mut |_, _| {}, &mut |text| {
//!     print!("{text}");
//!     Flow::Continue
//! })?;
//! # Ok::<(), tandem_runtime::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod chat;
mod durable;
pub mod engine;
pub mod error;
mod generate;
pub mod memory;
pub mod model;
pub mod policy;
pub mod sampling;
mod saved;
mod session;
mod session_file;
pub mod split;
pub mod tokenizer;

pub use engine::{
    default_model_path, resolve_model_path, Engine, EngineOptions, NAMED_MODELS, PREFILL_CHUNK,
};
pub use error::{Error, Result};
pub use generate::{Flow, GenerationStats, StopReason};
pub use sampling::SamplingConfig;
pub use saved::{SavedSession, SavedState};
pub use session::Session;
