//! Choosing the dense device a program runs on: `auto` (CUDA when a driver
//! and a usable GPU are present, else the CPU, saying why), `cpu`, or `cuda`
//! (an error when no usable GPU is present).
//!
//! The CUDA device is built in with the `cuda` feature; without it, `auto`
//! means the CPU and `cuda` is [`DeviceError::NotBuilt`].

#![forbid(unsafe_code)]

mod cuda;

use std::str::FromStr;

use tandem_gpu::{CpuDevice, DenseDevice};
use tandem_kernels::Isa;

/// Whether this build has the CUDA device.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The dense device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a driver and a usable GPU are present, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU; an error when there is none.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    /// `"auto"`, `"cpu"` or `"cuda"`.
    fn from_str(name: &str) -> Result<DeviceChoice, DeviceError> {
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(DeviceError::Unknown(other.to_string())),
        }
    }
}

/// Why a device cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A device name other than `auto`, `cpu` or `cuda`.
    #[error("unknown device {0:?}; expected \"auto\", \"cpu\" or \"cuda\"")]
    Unknown(String),
    /// The CUDA device is not built in.
    #[error("this build has no CUDA device (build with --features cuda)")]
    NotBuilt,
    /// CUDA is built in, but no usable GPU is present (no driver, no GPU, too
    /// old a GPU, or a CUDA library missing).
    #[error("{0}")]
    Unavailable(String),
}

/// Work written once for any dense device.
pub trait DeviceTask {
    /// What the work returns.
    type Output;

    /// Runs the work on `device`.
    fn run<D: DenseDevice + 'static>(self, device: D) -> Self::Output;
}

/// Runs `task` on the device `choice` selects, with `threads` for the CPU
/// device. When `auto` falls back to the CPU, `on_fallback` hears why first.
pub fn run_on<T: DeviceTask>(
    choice: DeviceChoice,
    threads: usize,
    task: T,
    on_fallback: impl FnOnce(&DeviceError),
) -> Result<T::Output, DeviceError> {
    let cpu = || CpuDevice::new(threads.max(1));
    match choice {
        DeviceChoice::Cpu => Ok(task.run(cpu())),
        DeviceChoice::Cuda => cuda::open().map(|device| cuda::run(device, task)),
        DeviceChoice::Auto => match cuda::open() {
            Ok(device) => Ok(cuda::run(device, task)),
            Err(why) => {
                on_fallback(&why);
                Ok(task.run(cpu()))
            }
        },
    }
}

/// The dense devices this machine offers: the CPU's SIMD and cores, and the
/// GPU or why there is none, one line each.
pub fn describe() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "cpu: {} SIMD, {cores} cores\ncuda: {}\n",
        Isa::detect().name(),
        cuda::describe()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Name;

    impl DeviceTask for Name {
        type Output = String;

        fn run<D: DenseDevice + 'static>(self, device: D) -> String {
            device.name()
        }
    }

    #[test]
    fn names_parse_and_others_are_refused() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda));
        let refused = "tpu".parse::<DeviceChoice>();
        assert_eq!(refused, Err(DeviceError::Unknown("tpu".into())));
    }

    #[test]
    fn the_cpu_is_always_there() {
        let name = run_on(DeviceChoice::Cpu, 1, Name, |_| panic!("no fallback"));
        assert!(name.is_ok_and(|name| name.starts_with("cpu")));
    }

    #[test]
    fn without_a_usable_gpu_auto_falls_back_and_cuda_fails() {
        if cuda::open().is_ok() {
            return;
        }
        let mut reason = None;
        let name = run_on(DeviceChoice::Auto, 1, Name, |why| {
            reason = Some(why.clone())
        });
        assert!(name.is_ok_and(|name| name.starts_with("cpu")));
        let cuda = run_on(DeviceChoice::Cuda, 1, Name, |_| panic!("no fallback"));
        assert_eq!(cuda.err(), reason);
    }
}
