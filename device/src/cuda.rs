//! The CUDA device where it is built in, and its absence where it is not.

#[cfg(feature = "cuda")]
mod built {
    use tandem_cuda::CudaDevice;

    use crate::{DeviceError, DeviceTask};

    pub fn open() -> Result<CudaDevice, DeviceError> {
        CudaDevice::new().map_err(|e| DeviceError::Unavailable(e.to_string()))
    }

    pub fn run<T: DeviceTask>(device: CudaDevice, task: T) -> T::Output {
        task.run(device)
    }

    pub fn describe() -> String {
        match tandem_cuda::probe() {
            Ok(gpu) => format!("{gpu}"),
            Err(why) => format!("not available: {why}"),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod built {
    use crate::{DeviceError, DeviceTask};

    /// No CUDA device is built in; no value of this type exists.
    pub enum Device {}

    pub fn open() -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt)
    }

    pub fn run<T: DeviceTask>(device: Device, _task: T) -> T::Output {
        match device {}
    }

    pub fn describe() -> String {
        format!("not available: {}", DeviceError::NotBuilt)
    }
}

pub use built::{describe, open, run};
