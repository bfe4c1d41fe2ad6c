//! tandem's dense device: the part of a decode step that runs on the GPU when there
//! is one, and on the CPU otherwise.
//!
//! [`DenseDevice`] is the one trait every implementation provides: it owns the
//! weights, the activations and each sequence's window of keys and values, and
//! says where data crosses to the host (see the trait's documentation). The
//! model's forward pass (in `tandem-runtime`) is written once against it.
//!
//! Implementations: [`CpuDevice`]. A CUDA implementation is not built yet;
//! [`cuda_status`] says so at run time, so callers can fall back with a clear message.

#![forbid(unsafe_code)]

mod cpu;
mod device;
mod error;
mod host;

pub use cpu::{CpuDevice, CpuKv};
pub use device::{Activation, DenseDevice, DeviceBuffer, KvLayer, RopeStyle};
pub use error::DeviceError;
pub use host::{AttentionShape, HostMatrix};

/// Whether a CUDA device can be used, and if not, why, for a clear fallback message.
pub fn cuda_status() -> Result<(), DeviceError> {
    Err(DeviceError::Unavailable(
        "the CUDA device is not implemented yet in this build; using the CPU".into(),
    ))
}
