//! The CUDA device's error type.

use tandem_gpu::DeviceError;

/// What can go wrong on the CUDA device.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable driver, GPU or NVRTC library.
    #[error("{0}")]
    Unavailable(String),
    /// A kernel source did not compile.
    #[error("kernel source {source_name}.cu does not compile for {arch}: {log}")]
    Compile {
        source_name: &'static str,
        arch: &'static str,
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
}

impl From<CudaError> for DeviceError {
    fn from(e: CudaError) -> DeviceError {
        match e {
            CudaError::Unavailable(why) => DeviceError::Unavailable(why),
            other => DeviceError::Job(other.to_string()),
        }
    }
}
