//! A hook for quality harnesses: it sees every offloaded layer's partials
//! before they merge, off the decode path when none is set.

use std::sync::Arc;

use tandem_cpu::{LayerOutput, LayerStore, WorkerPool};

use crate::error::Result;

/// One sparse layer's step of one sequence, as the merge is about to see it.
pub struct OffloadedStep<'a> {
    /// The layer.
    pub layer: usize,
    /// The step's queries, `T × n_heads × head_dim`, RoPE applied.
    pub queries: &'a [f32],
    /// The device's partial output over its rows (normalised), laid out like `queries`.
    pub device_out: &'a [f32],
    /// The device's log-sum-exps, `T × n_heads`.
    pub device_lse: &'a [f32],
    /// Rows the device attended (sinks, window and the new tokens).
    pub device_rows: usize,
    /// The CPU workers' partial over the offloaded store.
    pub offloaded: &'a LayerOutput,
    /// The offloaded store (e.g. to compute exact attention over the same keys).
    pub store: &'a Arc<LayerStore>,
    /// The CPU workers.
    pub pool: &'a WorkerPool,
}

/// Sees each offloaded layer's partials (see [`OffloadedStep`]).
pub trait SplitObserver: Send {
    /// Called once per sparse layer and step; an error fails the step.
    fn observe(&mut self, step: &OffloadedStep<'_>) -> Result<()>;
}
