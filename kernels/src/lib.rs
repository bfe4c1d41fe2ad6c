//! Pure compute kernels for tandem.
//!
//! Every kernel here is a safe function that picks, at run time, the best
//! implementation the CPU supports (AVX-512, AVX2+FMA, or portable scalar code),
//! so one binary runs on any x86-64 CPU and never executes an illegal instruction.
//! All `unsafe` SIMD in the workspace lives in this crate, and every SIMD path is
//! tested against its scalar reference on random inputs of odd sizes.
//!
//! The crate knows nothing of models, devices or LSH tables.

pub mod gaps;
pub mod hash;
pub mod int8;
pub mod isa;
pub mod mem;
pub mod ops;
pub mod parallel;
pub mod quant;
pub mod rng;
pub mod vector;

pub use isa::Isa;
