//! tandem's runtime: models, tokenizer, chat templates, sessions and the decode step.

pub mod chat;
pub mod error;
pub mod model;
pub mod tokenizer;

pub use error::{Error, Result};
