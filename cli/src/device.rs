//! `--device auto|cpu|cuda` on the command line; `tandem_device` makes the
//! choice, and `tandem devices` prints what it finds.

use anyhow::Result;
use clap::ValueEnum;
use tandem_gpu::DenseDevice;

pub use tandem_device::describe;

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

impl From<DeviceChoice> for tandem_device::DeviceChoice {
    fn from(choice: DeviceChoice) -> Self {
        match choice {
            DeviceChoice::Auto => tandem_device::DeviceChoice::Auto,
            DeviceChoice::Cpu => tandem_device::DeviceChoice::Cpu,
            DeviceChoice::Cuda => tandem_device::DeviceChoice::Cuda,
        }
    }
}

/// A command body written once for any dense device.
pub trait DeviceTask {
    /// Runs the command on `device`.
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()>;
}

/// A command body as `tandem_device` runs it.
struct Command<T>(T);

impl<T: DeviceTask> tandem_device::DeviceTask for Command<T> {
    type Output = Result<()>;

    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        self.0.run(device)
    }
}

/// Runs `task` on the device `choice` selects, with `threads` for the CPU device.
pub fn run_on(choice: DeviceChoice, threads: usize, task: impl DeviceTask) -> Result<()> {
    let fallback = |why: &tandem_device::DeviceError| eprintln!("tandem: using the CPU: {why}");
    tandem_device::run_on(choice.into(), threads, Command(task), fallback)
        .map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?
}
