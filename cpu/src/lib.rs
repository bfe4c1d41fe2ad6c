//! tandem's CPU attention engine: the offloaded KV store of one (sequence,
//! layer), its SimHash LSH index, sampled attention (MagicPIG's estimator),
//! the dense / top-k / oracle baselines, the log-sum-exp merge of partial
//! results, and a pool of pinned worker threads.
//!
//! Partial results use one convention everywhere: a part returns its output
//! **normalised within the part** (`sum_i softmax_i * v_i` over the part's keys)
//! and its log-sum-exp `lse = ln sum_i exp(logit_i)`; the un-normalised sum is
//! `exp(lse) * out`. An empty part returns a zero output and `lse = -inf`.
//! [`merge_partials`] combines any number of parts into one softmax over their
//! union.

mod attention;
mod pool;
mod store;

pub use attention::{ln_u_exact, merge_partials, HeadOutput, LshParams, Policy};
pub use pool::{LayerOutput, WorkerPool};
pub use store::{KvDtype, LayerConfig, LayerStore, PrefillTimes, MID_MIN, RAW_MAX};

/// Errors of the CPU attention engine.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An input slice has the wrong length.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A worker panicked or failed while computing a step.
    #[error("worker failed: {0}")]
    Worker(String),
    /// The store could not grow.
    #[error("offloaded KV store: {0}")]
    OutOfMemory(#[from] tandem_kernels::mem::OutOfMemory),
}
