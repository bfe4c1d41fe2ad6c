//! tandem's dense device on an NVIDIA GPU.

mod error;
mod sources;

pub use error::CudaError;
pub use sources::{nvrtc_present, KernelSource, SOURCES};
mod geometry;
pub mod twin;
pub use geometry::{Geometry, BLOCK, MAX_HEAD_DIM, SPLIT};
