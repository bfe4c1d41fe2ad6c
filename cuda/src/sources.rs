//! The kernel sources, embedded in the binary and compiled by NVRTC when the
//! device starts.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::error::CudaError;

/// Definitions every kernel source starts with (bf16 conversions, block reductions).
const COMMON: &str = include_str!("../kernels/common.cuh");

/// One compiled unit: its name and source (without [`COMMON`]).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The module's name, also the file's stem under `cuda/kernels/`.
    pub name: &'static str,
    /// CUDA C, without the common prelude.
    pub body: &'static str,
    /// The `extern "C"` kernels it defines.
    pub kernels: &'static [&'static str],
}

/// Every kernel source of the device.
pub const SOURCES: [KernelSource; 2] = [
    KernelSource {
        name: "elementwise",
        body: include_str!("../kernels/elementwise.cu"),
        kernels: &[
            "embed",
            "rms_norm",
            "rope",
            "silu_mul",
            "gelu_tanh_mul",
            "add",
            "scale",
            "add_bias",
            "to_bf16",
        ],
    },
    KernelSource {
        name: "attention",
        body: include_str!("../kernels/attention.cu"),
        kernels: &["attend_split", "combine", "merge"],
    },
];

impl KernelSource {
    /// The full source NVRTC compiles.
    pub fn text(&self) -> String {
        format!("{COMMON}\n{}", self.body)
    }

    /// Compiles the source to PTX for a virtual architecture such as `compute_90`.
    ///
    /// NVRTC must be loadable (`libnvrtc.so.12` on the library path); when it
    /// is not, cudarc panics, so callers check [`nvrtc_present`] first.
    pub fn compile(&self, arch: &'static str) -> Result<Ptx, CudaError> {
        let options = CompileOptions {
            arch: Some(arch),
            name: Some(format!("{}.cu", self.name)),
            // Uncontracted, the arithmetic follows the CPU twins step by step.
            fmad: Some(false),
            ..Default::default()
        };
        compile_ptx_with_opts(self.text(), options).map_err(|e| CudaError::Compile {
            source_name: self.name,
            arch,
            log: e.to_string(),
        })
    }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: this only tries to open the shared library and keeps the handle.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
