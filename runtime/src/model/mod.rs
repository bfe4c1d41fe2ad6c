//! Models: file formats, configuration, weights and the forward pass.

pub mod gguf;
pub mod llama;
pub mod safetensors;
pub mod weights;

pub use llama::{load_gguf, Config, Llama, Logits, Step};

/// Memory-maps a model file read-only, with errors that name it.
pub(crate) fn map_file(path: &std::path::Path) -> crate::Result<memmap2::Mmap> {
    let io = |cause| crate::Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; a model file changed underneath a running
    // process is outside what any mmap-based loader can defend against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}
