//! tandem's dense device on an NVIDIA GPU: [`CudaDevice`] implements
//! [`tandem_gpu::DenseDevice`] with cuBLAS matrix products (weights
//! dequantized to bf16 once at upload, f32 accumulation) and a few kernels
//! compiled by NVRTC when the device starts (embedding gather, RMS norm,
//! rotary embedding, gated activations, window attention returning the
//! log-sum-exp, and the merge of partials).
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading), so a
//! binary with this crate starts on a machine without the NVIDIA driver;
//! [`probe`] says what is there, and [`CudaDevice::new`] returns an error,
//! never a panic, when no usable GPU is.
//!
//! Without a GPU, the crate is still checked: every kernel source compiles
//! with NVRTC and assembles with ptxas for sm_80 and sm_90 (`tests/nvrtc.rs`),
//! each kernel has a CPU twin in [`twin`] with the same arithmetic, tested
//! against the CPU device, and the window's bookkeeping ([`WindowLayout`]) is
//! plain Rust.
//!
//! `unsafe` appears only where cudarc requires it (kernel launches,
//! uninitialised allocations, loading libraries, the cuBLAS call), each block
//! with a `// SAFETY:` comment.

mod device;
mod error;
mod geometry;
mod layout;
mod probe;
mod sources;
pub mod twin;

pub use device::{CudaBuffer, CudaDevice, CudaKv, CudaMatrix};
pub use error::CudaError;
pub use geometry::{Geometry, BLOCK, MAX_HEAD_DIM, SPLIT};
pub use layout::{Shift, WindowLayout};
pub use probe::{driver_present, probe, GpuInfo};
pub use sources::{nvrtc_present, KernelSource, SOURCES};
