//! What CUDA this machine offers, found without letting a panic out: cudarc
//! panics where a library it expects is missing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::CudaError;
use crate::sources::nvrtc_present;

/// The GPU a device runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Its name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Bytes of device memory.
    pub memory_bytes: usize,
    /// GPUs the driver sees.
    pub count: usize,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "{} (sm_{major}{minor}, {:.0} GiB){}",
            self.name,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            if self.count > 1 {
                format!(", GPU 0 of {}", self.count)
            } else {
                String::new()
            }
        )
    }
}

/// Runs `f`, turning a panic inside cudarc into an error.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(CudaError::Unavailable(format!("{what}: {why}")))
    })
}

/// Whether the driver library loads (without touching a GPU).
pub fn driver_present() -> bool {
    // SAFETY: this only tries to open the shared library and keeps the handle.
    guarded("loading the CUDA driver", || {
        Ok(unsafe { cudarc::driver::sys::is_culib_present() })
    })
    .unwrap_or(false)
}

/// The driver's first GPU and a context on it, or why there is none.
pub(crate) fn open_gpu() -> Result<(Arc<CudaContext>, GpuInfo), CudaError> {
    if !driver_present() {
        return Err(CudaError::Unavailable(
            "no NVIDIA driver (libcuda.so.1 does not load)".into(),
        ));
    }
    guarded("starting CUDA", || {
        let count = CudaContext::device_count()?;
        if count < 1 {
            return Err(CudaError::Unavailable(
                "the NVIDIA driver sees no GPU".into(),
            ));
        }
        let ctx = CudaContext::new(0)?;
        let info = GpuInfo {
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            memory_bytes: ctx.total_mem()?,
            count: count as usize,
        };
        Ok((ctx, info))
    })
}

/// The GPU a CUDA device would run on, or why there is none: the driver, a
/// GPU of compute capability 8.0 or newer, and NVRTC must all be present.
pub fn probe() -> Result<GpuInfo, CudaError> {
    let (_, info) = open_gpu()?;
    check_usable(&info)?;
    Ok(info)
}

/// Checks the GPU's generation and that kernels can be compiled for it.
pub(crate) fn check_usable(info: &GpuInfo) -> Result<(), CudaError> {
    if info.compute_capability.0 < 8 {
        return Err(CudaError::Unavailable(format!(
            "{info} is older than compute capability 8.0 (bf16 matrix products need it)"
        )));
    }
    if !guarded("loading NVRTC", || Ok(nvrtc_present()))? {
        return Err(CudaError::Unavailable(
            "NVRTC (libnvrtc.so.12) does not load; install it with scripts/setup.sh --cuda-toolchain \
             and put its directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    // SAFETY: this only tries to open the shared library and keeps the handle.
    let blas = guarded("loading cuBLAS", || {
        Ok(unsafe { cudarc::cublas::sys::is_culib_present() })
    })?;
    if !blas {
        return Err(CudaError::Unavailable(
            "cuBLAS (libcublas.so.12) does not load; install it with scripts/setup.sh --cuda-gpu \
             and put its directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// The virtual architecture kernels compile for on a GPU of `compute_capability`.
pub(crate) fn target_arch(compute_capability: (i32, i32)) -> &'static str {
    if compute_capability.0 >= 9 {
        "compute_90"
    } else {
        "compute_80"
    }
}
