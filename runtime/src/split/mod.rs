//! One sequence's keys and values, split between the dense device and the CPU
//! attention workers, and the attention step over both.
//!
//! A sparse layer keeps its sinks and recent window on the device and the
//! rest of its context in an offloaded store on the CPU workers; a dense
//! layer keeps everything on the device. [`attend`] runs one layer's
//! attention for a batch of sequences (the split protocol, in `step.rs`);
//! `offload.rs` moves a long context off the device and builds its stores;
//! `snapshot.rs` saves a sequence's state and loads it back; `fidelity.rs`
//! checks each sampled layer against exact attention after new content.

mod fidelity;
mod observer;
mod offload;
mod sequence;
mod snapshot;
mod step;
#[cfg(test)]
mod tests;

pub use fidelity::{merged_row_errors, LayerFidelity, RowError, PROBE_STEPS};
pub use observer::{OffloadedStep, SplitObserver};
pub use sequence::{SequenceKv, StepCounters};
pub(crate) use snapshot::SequenceCounts;
pub use step::attend;
