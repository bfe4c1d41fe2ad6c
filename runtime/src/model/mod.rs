//! Models: file formats, configuration, weights and the forward pass.

pub mod gguf;
pub mod llama;
pub mod safetensors;
pub mod weights;

pub use llama::{load_gguf, Config, Llama, Logits};
