//! `--device auto|cpu|cuda`: which dense device a command runs on, and
//! `tandem devices`, which says what this machine offers.

use anyhow::Result;
use clap::ValueEnum;
use tandem_gpu::{CpuDevice, DenseDevice};
use tandem_kernels::Isa;

/// The dense device asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when a driver and a usable GPU are present, else the CPU (saying why).
    Auto,
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU; an error when there is none.
    Cuda,
}

/// A command body written once for any dense device.
pub trait DeviceTask {
    /// Runs the command on `device`.
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()>;
}

/// Runs `task` on the device `choice` selects, with `threads` for the CPU device.
pub fn run_on(choice: DeviceChoice, threads: usize, task: impl DeviceTask) -> Result<()> {
    let cpu = || CpuDevice::new(threads.max(1));
    match choice {
        DeviceChoice::Cpu => task.run(cpu()),
        DeviceChoice::Cuda => match open_cuda() {
            Ok(device) => cuda::run(device, task),
            Err(why) => anyhow::bail!("--device cuda: {why}"),
        },
        DeviceChoice::Auto => match open_cuda() {
            Ok(device) => cuda::run(device, task),
            Err(why) => {
                eprintln!("tandem: using the CPU: {why}");
                task.run(cpu())
            }
        },
    }
}

/// What `tandem devices` prints.
pub fn describe() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "cpu: {} SIMD, {cores} cores\ncuda: {}\n",
        Isa::detect().name(),
        cuda::describe()
    )
}

fn open_cuda() -> Result<cuda::Device, String> {
    cuda::open()
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::Result;
    use tandem_cuda::CudaDevice;

    use super::DeviceTask;

    pub type Device = CudaDevice;

    pub fn open() -> Result<CudaDevice, String> {
        CudaDevice::new().map_err(|e| e.to_string())
    }

    pub fn run(device: CudaDevice, task: impl DeviceTask) -> Result<()> {
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
mod cuda {
    use anyhow::Result;

    use super::DeviceTask;

    /// No CUDA device is built in; no value of this type exists.
    pub enum Device {}

    const NOT_BUILT: &str = "this build has no CUDA device (build with --features cuda)";

    pub fn open() -> Result<Device, String> {
        Err(NOT_BUILT.into())
    }

    pub fn run(device: Device, _task: impl DeviceTask) -> Result<()> {
        match device {}
    }

    pub fn describe() -> String {
        format!("not available: {NOT_BUILT}")
    }
}
