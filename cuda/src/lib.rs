//! tandem's dense device on an NVIDIA GPU.

mod error;
mod sources;

pub use error::CudaError;
pub use sources::{nvrtc_present, KernelSource, SOURCES};
