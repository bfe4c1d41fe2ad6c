//! The engine's error type.

use tandem_kernels::hash::ProjectorError;
use tandem_kernels::mem::OutOfMemory;

/// Errors of the CPU attention engine.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An input slice has the wrong length.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A policy string could not be parsed (see [`crate::PolicySpec`]).
    #[error("bad policy {spec:?}: {problem}")]
    Policy {
        /// The string as given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A worker panicked or failed while computing a step.
    #[error("worker failed: {0}")]
    Worker(String),
    /// The LSH hyperplanes could not be built.
    #[error("hyperplanes: {0}")]
    Hyperplanes(#[from] ProjectorError),
    /// A saved store's state does not fit its configuration.
    #[error("saved store: {0}")]
    Snapshot(String),
    /// The store could not grow.
    #[error("offloaded KV store: {0}")]
    OutOfMemory(#[from] OutOfMemory),
}
