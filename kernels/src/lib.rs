//! Pure compute kernels for tandem.
//!
//! Every kernel here is a safe function that picks, at run time, the best
//! implementation the CPU supports (AVX-512, AVX2+FMA, or portable scalar code),
//! so one binary runs on any x86-64 CPU and never executes an illegal instruction.
//! All `unsafe` SIMD in the workspace lives in this crate, and every SIMD path is
//! tested against its scalar reference on random inputs of odd sizes.
//!
//! The crate knows nothing of models, devices or LSH tables.

/// Calls `$f::<G>(args)` for a head count `G` known at run time, 1 to 8 (the
/// query heads of a GQA group), so each count gets its own unrolled kernel;
/// other counts call nothing.
macro_rules! dispatch_g {
    ($g:expr, $f:ident, $($arg:expr),*) => {
        match $g {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => {}
        }
    };
}

pub mod gaps;
pub mod hash;
pub mod heads;
pub mod int8;
pub mod isa;
pub mod masks;
pub mod mem;
pub mod ops;
pub mod packed;
pub mod parallel;
pub mod quant;
pub mod rng;
pub mod sas;
pub mod sketch;
pub mod stream;
pub mod vector;

pub use isa::Isa;
