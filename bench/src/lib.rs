//! tandem benchmarks (in progress).
