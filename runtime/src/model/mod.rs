//! Models: file formats, configuration, weights and the forward pass.

mod config;
pub mod gguf;
mod llama;
mod load;
pub mod safetensors;
pub mod weights;

pub use config::Config;
pub use llama::{Llama, Logits, Step};
pub use load::load_gguf;

use tandem_kernels::mem::MappedFile;

/// Memory-maps a model file read-only, with errors that name it.
pub(crate) fn map_file(path: &std::path::Path) -> crate::Result<MappedFile> {
    MappedFile::open(path).map_err(|cause| crate::Error::Io {
        path: path.to_path_buf(),
        cause,
    })
}

#[cfg(test)]
mod tests;
