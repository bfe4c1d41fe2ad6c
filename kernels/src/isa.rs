//! Run-time selection of the instruction set the kernels use.
//!
//! All CPU-feature detection of the crate lives here: the kernels ask this
//! module which level to run ([`Isa::detect`]), cap an explicitly requested
//! level at what the CPU supports ([`effective`]), and query the few features
//! outside the [`Isa`] levels ([`has_avx512vbmi`]).

use std::sync::OnceLock;

/// The instruction-set level a kernel runs with.
///
/// Ordered: a CPU that supports a level supports every level below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust; runs everywhere.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell and later).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI and BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// The best level this CPU supports, capped by the `TANDEM_ISA` environment
    /// variable (`scalar`, `avx2` or `avx512`) when it is set. Detected once.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = best_supported();
            match std::env::var("TANDEM_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => best.min(Isa::Avx2),
                _ => best,
            }
        })
    }

    /// Every level this CPU supports, lowest first. Tests use this to check
    /// each implementation against the scalar reference.
    pub fn all_supported() -> Vec<Isa> {
        let best = best_supported();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| *isa <= best)
            .collect()
    }

    /// A short name, for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn probe() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// The best level this CPU supports, ignoring `TANDEM_ISA`; detected once.
pub(crate) fn best_supported() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(Isa::probe)
}

/// Caps a requested level at what this CPU supports, so a kernel asked for a
/// level the CPU lacks runs the best one it has and never an illegal
/// instruction.
#[inline]
pub(crate) fn effective(isa: Isa) -> Isa {
    isa.min(best_supported())
}

/// Whether the CPU has AVX512_VBMI (byte permutes across a whole register),
/// which the AVX-512 gap decoder needs on top of [`Isa::Avx512`]; detected once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512vbmi() -> bool {
    static VBMI: OnceLock<bool> = OnceLock::new();
    *VBMI.get_or_init(|| is_x86_feature_detected!("avx512vbmi"))
}
