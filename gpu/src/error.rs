//! The device's error type.

/// What can go wrong on a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A buffer or matrix had the wrong shape for the operation.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A parallel job panicked (a bug); the step is abandoned, the process survives.
    #[error("a device job failed: {0}")]
    Job(String),
    /// The device asked for is not available here.
    #[error("{0}")]
    Unavailable(String),
}
