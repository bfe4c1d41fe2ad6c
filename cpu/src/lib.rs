//! tandem's CPU attention engine: the offloaded KV store of one (sequence,
//! layer), its SimHash LSH index, sampled attention (MagicPIG's estimator),
//! the dense / top-k / oracle baselines, threshold (half-space) reporting
//! over per-block key bounds, the log-sum-exp merge of partial
//! results, and a pool of pinned worker threads.
//!
//! Partial results use one convention everywhere: a part returns its output
//! **normalised within the part** (`sum_i softmax_i * v_i` over the part's keys)
//! and its log-sum-exp `lse = ln sum_i exp(logit_i)`; the un-normalised sum is
//! `exp(lse) * out`. An empty part returns a zero output and `lse = -inf`.
//! [`merge_partials`] combines any number of parts into one softmax over their
//! union.
//!
//! Modules, each depending only on those above it: `error`, `config`,
//! `policy`, `shared`, `estimator`, `row_blocks`, `channels`, `packed`,
//! `rows`, `reads`, `index`, `bounds`, `store`,
//! `sketch`, `retrieval`, `attend`, `pool`, `diagnose`, with `snapshot` (a
//! store's state as arrays, for saved sessions) right after `error`.

#![forbid(unsafe_code)]

mod attend;
mod bounds;
mod channels;
mod config;
mod diagnose;
mod error;
mod estimator;
mod index;
mod packed;
mod policy;
mod pool;
mod reads;
mod retrieval;
mod rotation;
mod row_blocks;
mod rows;
mod shared;
mod sketch;
mod snapshot;
mod store;

pub use bounds::BOUND_BLOCK;
pub use config::{
    store_bytes_per_key, KvDtype, LayerConfig, LshIndexParams, Precision, VALUE_GROUP,
};
pub use diagnose::HeadMass;
pub use error::CpuError;
pub use estimator::ln_u_exact;
pub use index::{MID_MIN, RAW_MAX};
pub use policy::{
    policy_kinds, sketch_rank_for, Attend, LshParams, Policy, PolicySpec, ThresholdParams,
};
pub use pool::{LayerOutput, WorkerPool};
pub use snapshot::{ArrayReader, ArrayWriter, LeElem};
pub use store::{LayerStore, PrefillTimes};
/// The log-sum-exp merge of partial results (the convention above).
pub use tandem_kernels::ops::merge_partials;
/// The softmax modes of the attention passes (exact, or TurboAttention's SAS).
pub use tandem_kernels::sas::Softmax;
