//! tandem's dense device: the part of a decode step that runs on the GPU when there
//! is one, and on the CPU otherwise.
//!
//! [`DenseDevice`] is the one trait every implementation provides: it owns the
//! weights, the activations and each sequence's window of keys and values, and
//! says where data crosses to the host (see the trait's documentation). The
//! model's forward pass (in `tandem-runtime`) is written once against it.
//!
//! Implementations: [`CpuDevice`] here; the CUDA device is `tandem-cuda`'s
//! `CudaDevice` (a separate crate, as it needs `unsafe` for its launches).

#![forbid(unsafe_code)]

mod cpu;
mod device;
mod error;
mod host;
pub mod shape;

pub use cpu::{CpuDevice, CpuKv};
pub use device::{Activation, DenseDevice, DeviceBuffer, KvLayer, RopeStyle};
pub use error::DeviceError;
pub use host::{AttentionShape, HostMatrix};
