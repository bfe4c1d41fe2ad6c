//! Models: file formats, configuration, weights and the forward pass.

pub mod gguf;
