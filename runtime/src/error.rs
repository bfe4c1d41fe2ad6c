//! The runtime's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running it.
///
/// Errors about a file always name the file, so the user knows which one to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read. (The I/O error is part of the message,
    /// not a separate `source`, so error chains do not print it twice.)
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file is not a model tandem can read, or is damaged.
    #[error("{path}: {problem}")]
    BadModel { path: PathBuf, problem: String },
    /// The model is well formed but uses something tandem does not support.
    #[error("{path}: unsupported: {problem}")]
    Unsupported { path: PathBuf, problem: String },
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A request that cannot be served as asked (bad token id, context full, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// A context or batch that would not fit in the memory budget
    /// ([`crate::memory::MemoryBudget`]); refused before allocating.
    #[error(
        "{what} needs {need} of memory, more than the {limit} allowed ({origin}); \
         a shorter context, a quantized store (a policy with kbits=4,vbits=4, say) or fewer sequences need less"
    )]
    OutOfMemory {
        what: String,
        need: String,
        limit: String,
        origin: String,
    },
    /// The caller's cancel flag stopped the work; what it had added was undone.
    #[error("cancelled")]
    Cancelled,
    /// The dense device failed.
    #[error("dense device: {0}")]
    Device(#[from] tandem_gpu::DeviceError),
    /// The CPU attention engine failed (its workers, or an offloaded store).
    #[error("CPU attention: {0}")]
    Cpu(#[from] tandem_cpu::CpuError),
    /// A saved session file is damaged, or was saved with another model or policy.
    #[error("{path}: {problem}")]
    SessionFile { path: PathBuf, problem: String },
    /// A step failed half-way through this sequence earlier; it must be reset.
    #[error("this sequence was left inconsistent by a failed step; reset it")]
    BrokenSequence,
}

impl Error {
    pub(crate) fn bad_model(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
