//! tandem's harnesses, above the library: the attention benchmark, the decode
//! benchmark and the quality evaluation behind `tandem bench` and `tandem eval`.
//! Each runs the library as a user would and reports in one run against a
//! baseline (dense attention, or another policy).

#![forbid(unsafe_code)]

pub mod attention;
pub mod calibrate;
pub mod decode;
pub mod eval;

pub use attention::{
    format_table, run_attention_bench, AttentionBenchOptions, AttentionBenchResult, BenchError,
};
