//! SimHash kernels: projections of many vectors onto many hyperplanes (a blocked
//! matrix product), packed into sign bits, K-bit table codes cut from those bits,
//! and a scan that collects the positions of collision counters reaching a
//! threshold.
//!
//! Every projection is computed as one fused multiply-add chain over the
//! dimensions in order `0..d`, on every ISA, so the sign bits are bit-for-bit
//! identical whichever ISA computed them (tests check this). A projection of
//! exactly 0 gives a 0 bit.

use crate::Isa;

/// Why a [`Projector`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectorError {
    /// `planes.len()` is not `n_planes * dim`, or a size is zero.
    BadShape,
}

impl std::fmt::Display for ProjectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProjectorError::BadShape => write!(f, "hyperplane matrix has the wrong shape"),
        }
    }
}

impl std::error::Error for ProjectorError {}

/// Plane-block width of the micro-kernels; `n_planes` is padded to a multiple.
const NB: usize = 32;
/// Keys per cache tile.
const KEY_TILE: usize = 64;

/// A set of hyperplanes, stored transposed and padded for the blocked product.
///
/// Plane components are rounded to bf16 when the projector is built and
/// kept both as f32 (for hashing many keys, where the FMAs are the cost) and
/// as bf16 (for hashing a few queries, where reading the planes is): the
/// same values, so both give the same bits.
#[derive(Debug, Clone)]
pub struct Projector {
    dim: usize,
    n_planes: usize,
    padded: usize,
    /// Blocked and transposed: for each block of `NB` planes, `dim` rows of
    /// `NB` components (`planes_t[(j / NB) * dim * NB + k * NB + j % NB]` is
    /// component `k` of plane `j`), so one block's product streams through
    /// contiguous memory.
    planes_t: Vec<f32>,
    /// `planes_t` as bf16 bits.
    planes_bf16: Vec<u16>,
}

impl Projector {
    /// Builds a projector from `n_planes` hyperplanes of dimension `dim`, given
    /// row-major (`planes[j * dim + k]` is component `k` of plane `j`) and
    /// rounded to bf16.
    pub fn new(dim: usize, n_planes: usize, planes: &[f32]) -> Result<Self, ProjectorError> {
        if dim == 0 || n_planes == 0 || planes.len() != dim * n_planes {
            return Err(ProjectorError::BadShape);
        }
        let padded = n_planes.div_ceil(NB) * NB;
        let mut planes_bf16 = vec![0u16; dim * padded];
        for j in 0..n_planes {
            for k in 0..dim {
                planes_bf16[(j / NB) * dim * NB + k * NB + j % NB] =
                    half::bf16::from_f32(planes[j * dim + k]).to_bits();
            }
        }
        let planes_t = planes_bf16
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        Ok(Projector {
            dim,
            n_planes,
            padded,
            planes_t,
            planes_bf16,
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of hyperplanes (sign bits per vector).
    pub fn n_planes(&self) -> usize {
        self.n_planes
    }

    /// Number of u64 words of sign bits per vector.
    pub fn words_per_vector(&self) -> usize {
        self.padded.div_ceil(64)
    }

    /// Sign bits of every row of `xs` (row-major, `dim` columns) (auto-dispatch).
    /// See [`Projector::sign_bits_with`].
    pub fn sign_bits(&self, xs: &[f32], out: &mut [u64]) {
        self.sign_bits_with(Isa::detect(), xs, out)
    }

    /// Writes the sign bits of the projections of the `xs.len() / dim` rows of
    /// `xs` onto the hyperplanes: bit `j` of row `i` is
    /// `out[i * words_per_vector() + j / 64] >> (j % 64) & 1`, set iff the
    /// projection on plane `j` is > 0. Bits past `n_planes` are 0. Rows beyond
    /// what `out` can hold are ignored.
    pub(crate) fn sign_bits_with(&self, isa: Isa, xs: &[f32], out: &mut [u64]) {
        let w = self.words_per_vector();
        let n = (xs.len() / self.dim).min(out.len() / w);
        let xs = &xs[..n * self.dim];
        let out = &mut out[..n * w];
        out.iter_mut().for_each(|x| *x = 0);
        match crate::isa::effective(isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX-512F; shapes were checked above.
            Isa::Avx512 => unsafe { x86::sign_bits_avx512(self, xs, out, n) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX2 and FMA; shapes were checked above.
            Isa::Avx2 => unsafe { x86::sign_bits_avx2(self, xs, out, n) },
            _ => self.sign_bits_scalar(xs, out, n),
        }
    }

    fn sign_bits_scalar(&self, xs: &[f32], out: &mut [u64], n: usize) {
        let w = self.words_per_vector();
        for i in 0..n {
            let x = &xs[i * self.dim..(i + 1) * self.dim];
            for j in 0..self.n_planes {
                let mut acc = 0.0f32;
                for (k, xk) in x.iter().enumerate() {
                    acc = xk.mul_add(
                        self.planes_t[(j / NB) * self.dim * NB + k * NB + j % NB],
                        acc,
                    );
                }
                if acc > 0.0 {
                    out[i * w + j / 64] |= 1u64 << (j % 64);
                }
            }
        }
    }
}

/// The `k`-bit code of table `table` cut from one vector's sign bits: bits
/// `table * k .. table * k + k`, lowest bit first. `k` must be in `1..=16`
/// (larger values are clamped to 16); bits past the end of `bits` read as 0.
#[inline]
pub fn table_code(bits: &[u64], table: usize, k: usize) -> u16 {
    let k = k.clamp(1, 16);
    let start = table * k;
    let (word, shift) = (start / 64, start % 64);
    let lo = bits.get(word).copied().unwrap_or(0) >> shift;
    let hi = if shift + k > 64 {
        bits.get(word + 1).copied().unwrap_or(0) << (64 - shift)
    } else {
        0
    };
    ((lo | hi) & ((1u64 << k) - 1)) as u16
}

/// Writes into `out` (in increasing order) the indices `i` with
/// `counts[i] >= t`, offset by `base`, and returns how many were written.
/// Stops early if `out` is full. Auto-dispatch.
pub fn collect_at_least(counts: &[u8], t: u8, base: u32, out: &mut [u32]) -> usize {
    collect_at_least_with(Isa::detect(), counts, t, base, out)
}

/// [`collect_at_least`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn collect_at_least_with(
    isa: Isa,
    counts: &[u8],
    t: u8,
    base: u32,
    out: &mut [u32],
) -> usize {
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512BW.
        Isa::Avx512 => unsafe { x86::collect_avx512(counts, t, base, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2.
        Isa::Avx2 => unsafe { x86::collect_avx2(counts, t, base, out) },
        _ => collect_scalar(counts, t, base, out, 0, 0),
    }
}

fn collect_scalar(
    counts: &[u8],
    t: u8,
    base: u32,
    out: &mut [u32],
    from: usize,
    mut n: usize,
) -> usize {
    for (i, &c) in counts.iter().enumerate().skip(from) {
        if c >= t {
            if n == out.len() {
                return n;
            }
            out[n] = base + i as u32;
            n += 1;
        }
    }
    n
}

/// Counts `i < min(a.len(), b.len())` with `a[i] == b[i]` (auto-dispatch):
/// how many of a key's table codes equal a query's.
pub fn count_equal_u16(a: &[u16], b: &[u16]) -> usize {
    count_equal_u16_with(Isa::detect(), a, b)
}

/// [`count_equal_u16`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn count_equal_u16_with(isa: Isa, a: &[u16], b: &[u16]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512BW; slices have equal length.
        Isa::Avx512 => unsafe { x86::count_equal_avx512(a, b) },
        _ => a.iter().zip(b).filter(|(x, y)| x == y).count(),
    }
}

/// Width of the per-head collision counters packed in one u32 per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// Four 8-bit counters (head `h` in bits `8h..8h+8`).
    U8x4,
    /// Two 16-bit counters (head `h` in bits `16h..16h+16`).
    U16x2,
}

impl Lanes {
    /// Counters per u32.
    pub fn count(self) -> usize {
        match self {
            Lanes::U8x4 => 4,
            Lanes::U16x2 => 2,
        }
    }

    /// Bits per counter.
    pub fn bits(self) -> u32 {
        match self {
            Lanes::U8x4 => 8,
            Lanes::U16x2 => 16,
        }
    }
}

/// Scans packed per-head counters: for every key `i` (in increasing order)
/// with at least one counter `>= t`, writes `base + i` to `ids` and the bit
/// set of those counters (bit `h` for counter `h`) to `masks`. Sets every
/// element of `counts` to 0 (all of them, even if `ids` or `masks` fills up
/// first; keys past the capacity are dropped). Returns how many keys were
/// written. `t = 0` is treated as 1. Auto-dispatch.
pub fn collect_lanes(
    counts: &mut [u32],
    lanes: Lanes,
    t: u16,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
) -> usize {
    collect_lanes_with(Isa::detect(), counts, lanes, t, base, ids, masks)
}

/// [`collect_lanes`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn collect_lanes_with(
    isa: Isa,
    counts: &mut [u32],
    lanes: Lanes,
    t: u16,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
) -> usize {
    let t = t.max(1);
    let cap = ids.len().min(masks.len());
    let (ids, masks) = (&mut ids[..cap], &mut masks[..cap]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; `ids` and `masks` have equal length.
        Isa::Avx512 => unsafe { x86::collect_lanes_avx512(counts, lanes, t, base, ids, masks) },
        _ => collect_lanes_scalar(counts, lanes, t, base, ids, masks, 0, 0),
    }
}

#[allow(clippy::too_many_arguments)]
fn collect_lanes_scalar(
    counts: &mut [u32],
    lanes: Lanes,
    t: u16,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
    from: usize,
    mut n: usize,
) -> usize {
    let (nl, bits) = (lanes.count(), lanes.bits());
    let lane_max = (1u32 << bits) - 1;
    for (i, c) in counts.iter_mut().enumerate().skip(from) {
        let v = std::mem::take(c);
        if v == 0 {
            continue;
        }
        let mut m = 0u8;
        for h in 0..nl {
            if (v >> (bits * h as u32)) & lane_max >= u32::from(t) {
                m |= 1 << h;
            }
        }
        if m != 0 && n < ids.len() {
            ids[n] = base + i as u32;
            masks[n] = m;
            n += 1;
        }
    }
    n
}

/// Per-key pair counters: four heads' 2-bit saturating collision counters in
/// one byte, head `h` in bits `2h` ("hit at least once") and `2h + 1` ("hit at
/// least twice"). A quarter of [`Lanes::U8x4`]'s memory, enough for `t <= 2`.
///
/// Counts one collision of the heads in `heads` (bit `h` for head `h`) for the
/// key whose byte is `b`.
#[inline(always)]
pub fn pair_count(b: u8, heads: u8) -> u8 {
    let once = spread_heads(heads);
    b | ((b & once) << 1) | once
}

/// Head bits `h` (0..4) moved to bit `2h`.
#[inline(always)]
pub(crate) fn spread_heads(heads: u8) -> u8 {
    let x = heads & 0x0F;
    let x = (x | (x << 2)) & 0x33;
    (x | (x << 1)) & 0x55
}

/// Bits `2h` (0..4) moved to bit `h`.
#[inline(always)]
fn gather_heads(x: u8) -> u8 {
    let x = x & 0x55;
    let x = (x | (x >> 1)) & 0x33;
    (x | (x >> 2)) & 0x0F
}

/// Scans pair counters (see [`pair_count`]): for every key `i`, in increasing
/// order, with a head that reached `t` (1 or 2; 0 counts as 1, more as 2),
/// writes `base + i` to `ids` and those heads' bits to `masks`. Sets every
/// counter to 0 (keys past the capacity of `ids`/`masks` are dropped).
/// Returns how many keys were written. Auto-dispatch.
pub fn collect_pairs(
    counts: &mut [u8],
    t: u8,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
) -> usize {
    collect_pairs_with(Isa::detect(), counts, t, base, ids, masks)
}

/// [`collect_pairs`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn collect_pairs_with(
    isa: Isa,
    counts: &mut [u8],
    t: u8,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
) -> usize {
    let cap = ids.len().min(masks.len());
    let (ids, masks) = (&mut ids[..cap], &mut masks[..cap]);
    let shift = u32::from(t >= 2);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512BW; `ids` and `masks` have equal length.
        Isa::Avx512 => unsafe { x86::collect_pairs_avx512(counts, shift, base, ids, masks) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2; `ids` and `masks` have equal length.
        Isa::Avx2 => unsafe { x86::collect_pairs_avx2(counts, shift, base, ids, masks) },
        _ => collect_pairs_scalar(counts, shift, base, ids, masks, 0, 0),
    }
}

fn collect_pairs_scalar(
    counts: &mut [u8],
    shift: u32,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
    from: usize,
    mut n: usize,
) -> usize {
    for (i, c) in counts.iter_mut().enumerate().skip(from) {
        let m = gather_heads(std::mem::take(c) >> shift);
        if m != 0 && n < ids.len() {
            ids[n] = base + i as u32;
            masks[n] = m;
            n += 1;
        }
    }
    n
}

/// The SIMD scans' output step: for each set bit `k` of `hit` (a key at
/// `at + k` whose counter byte `held[k]` reached the threshold), writes the key
/// and its heads at `n` while there is room; returns the new `n`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn push_pair_hits(
    mut hit: u64,
    held: &[u8],
    at: usize,
    shift: u32,
    base: u32,
    ids: &mut [u32],
    masks: &mut [u8],
    mut n: usize,
) -> usize {
    while hit != 0 {
        let k = hit.trailing_zeros() as usize;
        hit &= hit - 1;
        if n < ids.len() {
            ids[n] = base + (at + k) as u32;
            masks[n] = gather_heads(held[k] >> shift);
            n += 1;
        }
    }
    n
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// `MR` rows against one block of `NB` planes, read as f32 or, with
    /// `BF16`, as bf16 widened exactly (half the bytes, the same sums).
    #[target_feature(enable = "avx512f")]
    unsafe fn block512<const MR: usize, const BF16: bool>(
        p: &Projector,
        xs: *const f32,
        out: *mut u64,
        w: usize,
        jb: usize,
    ) {
        let d = p.dim;
        let pt = p.planes_t.as_ptr().add(jb * d);
        let pb = p.planes_bf16.as_ptr().add(jb * d);
        let widen = |q: *const u16| {
            let x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(q as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x))
        };
        let mut acc0 = [_mm512_setzero_ps(); MR];
        let mut acc1 = [_mm512_setzero_ps(); MR];
        for k in 0..d {
            let (p0, p1) = if BF16 {
                (widen(pb.add(k * NB)), widen(pb.add(k * NB + 16)))
            } else {
                (
                    _mm512_loadu_ps(pt.add(k * NB)),
                    _mm512_loadu_ps(pt.add(k * NB + 16)),
                )
            };
            for r in 0..MR {
                let x = _mm512_set1_ps(*xs.add(r * d + k));
                acc0[r] = _mm512_fmadd_ps(x, p0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(x, p1, acc1[r]);
            }
        }
        let z = _mm512_setzero_ps();
        for r in 0..MR {
            let m0 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(acc0[r], z) as u64;
            let m1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(acc1[r], z) as u64;
            *out.add(r * w + jb / 64) |= (m0 | (m1 << 16)) << (jb % 64);
        }
    }

    /// One row against `NBLK` consecutive plane blocks (same per-plane FMA
    /// order as [`block512`]).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block512_wide<const NBLK: usize>(
        p: &Projector,
        x: *const f32,
        out: *mut u64,
        jb: usize,
    ) {
        let d = p.dim;
        let pt = p.planes_t.as_ptr().add(jb * d);
        let mut acc0 = [_mm512_setzero_ps(); NBLK];
        let mut acc1 = [_mm512_setzero_ps(); NBLK];
        for k in 0..d {
            let xv = _mm512_set1_ps(*x.add(k));
            for b in 0..NBLK {
                let pb = pt.add(b * NB * d + k * NB);
                acc0[b] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pb), acc0[b]);
                acc1[b] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pb.add(16)), acc1[b]);
            }
        }
        let z = _mm512_setzero_ps();
        for b in 0..NBLK {
            let j = jb + b * NB;
            let m0 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(acc0[b], z) as u64;
            let m1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(acc1[b], z) as u64;
            *out.add(j / 64) |= (m0 | (m1 << 16)) << (j % 64);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sign_bits_avx512(p: &Projector, xs: &[f32], out: &mut [u64], n: usize) {
        let w = p.words_per_vector();
        let d = p.dim;
        if n <= 8 {
            // A few queries: the planes' bytes are the cost, so read bf16.
            // All of them in one pass over the planes.
            let (x, o) = (xs.as_ptr(), out.as_mut_ptr());
            let mut jb = 0;
            while jb < p.padded {
                match n {
                    0 => {}
                    1 => block512::<1, true>(p, x, o, w, jb),
                    2 => block512::<2, true>(p, x, o, w, jb),
                    3 => block512::<3, true>(p, x, o, w, jb),
                    4 => block512::<4, true>(p, x, o, w, jb),
                    5 => block512::<5, true>(p, x, o, w, jb),
                    6 => block512::<6, true>(p, x, o, w, jb),
                    7 => block512::<7, true>(p, x, o, w, jb),
                    _ => block512::<8, true>(p, x, o, w, jb),
                }
                jb += NB;
            }
            return;
        }
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + KEY_TILE).min(n);
            let mut jb = 0;
            while jb < p.padded {
                let mut i = t0;
                while i + 8 <= t1 {
                    block512::<8, false>(
                        p,
                        xs.as_ptr().add(i * d),
                        out.as_mut_ptr().add(i * w),
                        w,
                        jb,
                    );
                    i += 8;
                }
                if i + 4 <= t1 {
                    block512::<4, false>(
                        p,
                        xs.as_ptr().add(i * d),
                        out.as_mut_ptr().add(i * w),
                        w,
                        jb,
                    );
                    i += 4;
                }
                if i + 2 <= t1 {
                    block512::<2, false>(
                        p,
                        xs.as_ptr().add(i * d),
                        out.as_mut_ptr().add(i * w),
                        w,
                        jb,
                    );
                }
                jb += NB;
            }
            if (t1 - t0) % 2 == 1 {
                // One row left: four plane blocks at once, so eight
                // independent chains hide the FMA latency.
                let i = t1 - 1;
                let (x, o) = (xs.as_ptr().add(i * d), out.as_mut_ptr().add(i * w));
                let mut jb = 0;
                while jb + 4 * NB <= p.padded {
                    block512_wide::<4>(p, x, o, jb);
                    jb += 4 * NB;
                }
                while jb < p.padded {
                    block512::<1, false>(p, x, o, w, jb);
                    jb += NB;
                }
            }
            t0 = t1;
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block256<const MR: usize>(
        p: &Projector,
        xs: *const f32,
        out: *mut u64,
        w: usize,
        jb: usize,
    ) {
        let d = p.dim;
        let pt = p.planes_t.as_ptr().add(jb * d);
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        for k in 0..d {
            let row = pt.add(k * NB);
            let pv = [
                _mm256_loadu_ps(row),
                _mm256_loadu_ps(row.add(8)),
                _mm256_loadu_ps(row.add(16)),
                _mm256_loadu_ps(row.add(24)),
            ];
            for r in 0..MR {
                let x = _mm256_set1_ps(*xs.add(r * d + k));
                for c in 0..4 {
                    acc[r][c] = _mm256_fmadd_ps(x, pv[c], acc[r][c]);
                }
            }
        }
        let z = _mm256_setzero_ps();
        for r in 0..MR {
            let mut m = 0u64;
            for c in 0..4 {
                let bits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(acc[r][c], z)) as u64;
                m |= bits << (8 * c);
            }
            *out.add(r * w + jb / 64) |= m << (jb % 64);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sign_bits_avx2(p: &Projector, xs: &[f32], out: &mut [u64], n: usize) {
        let w = p.words_per_vector();
        let d = p.dim;
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + KEY_TILE).min(n);
            let mut jb = 0;
            while jb < p.padded {
                let mut i = t0;
                while i + 3 <= t1 {
                    block256::<3>(
                        p,
                        xs.as_ptr().add(i * d),
                        out.as_mut_ptr().add(i * w),
                        w,
                        jb,
                    );
                    i += 3;
                }
                while i < t1 {
                    block256::<1>(
                        p,
                        xs.as_ptr().add(i * d),
                        out.as_mut_ptr().add(i * w),
                        w,
                        jb,
                    );
                    i += 1;
                }
                jb += NB;
            }
            t0 = t1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn count_equal_avx512(a: &[u16], b: &[u16]) -> usize {
        let n = a.len();
        let (pa, pb) = (a.as_ptr() as *const i16, b.as_ptr() as *const i16);
        let mut c = 0u32;
        let mut i = 0;
        while i < n {
            let rem = (n - i).min(32);
            let m: __mmask32 = if rem == 32 { !0 } else { (1u32 << rem) - 1 };
            let x = _mm512_maskz_loadu_epi16(m, pa.add(i));
            let y = _mm512_maskz_loadu_epi16(m, pb.add(i));
            c += (_mm512_cmpeq_epi16_mask(x, y) & m).count_ones();
            i += 32;
        }
        c as usize
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn collect_lanes_avx512(
        counts: &mut [u32],
        lanes: Lanes,
        t: u16,
        base: u32,
        ids: &mut [u32],
        masks: &mut [u8],
    ) -> usize {
        let len = counts.len();
        let p = counts.as_mut_ptr();
        let z = _mm512_setzero_si512();
        let cap = ids.len();
        let mut n = 0;
        let mut i = 0;
        // 16 keys per step; `m` has `per` bits per key.
        let (per, kmask) = match lanes {
            Lanes::U8x4 => (4u32, 0xFu64),
            Lanes::U16x2 => (2u32, 0x3u64),
        };
        let t8 = _mm512_set1_epi8(t.min(255) as i8);
        let t16 = _mm512_set1_epi16(t as i16);
        let big8 = t > 255;
        while i + 16 <= len {
            let v = _mm512_loadu_si512(p.add(i) as *const __m512i);
            let mut m: u64 = match lanes {
                Lanes::U8x4 if big8 => 0,
                Lanes::U8x4 => _mm512_cmpge_epu8_mask(v, t8),
                Lanes::U16x2 => u64::from(_mm512_cmpge_epu16_mask(v, t16)),
            };
            if m != 0 {
                _mm512_storeu_si512(p.add(i) as *mut __m512i, z);
                while m != 0 {
                    let key = m.trailing_zeros() / per;
                    let km = (m >> (key * per)) & kmask;
                    m &= !(kmask << (key * per));
                    if n < cap {
                        *ids.get_unchecked_mut(n) = base + i as u32 + key;
                        *masks.get_unchecked_mut(n) = km as u8;
                        n += 1;
                    }
                }
            } else if _mm512_test_epi32_mask(v, v) != 0 {
                _mm512_storeu_si512(p.add(i) as *mut __m512i, z);
            }
            i += 16;
        }
        collect_lanes_scalar(counts, lanes, t, base, ids, masks, i, n)
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn collect_pairs_avx512(
        counts: &mut [u8],
        shift: u32,
        base: u32,
        ids: &mut [u32],
        masks: &mut [u8],
    ) -> usize {
        let len = counts.len();
        let p = counts.as_mut_ptr();
        let reached = _mm512_set1_epi8((0x55u8 << shift) as i8);
        let zero = _mm512_setzero_si512();
        let mut n = 0;
        let mut i = 0;
        let mut held = [0u8; 64];
        while i + 64 <= len {
            let v = _mm512_loadu_si512(p.add(i) as *const __m512i);
            if _mm512_test_epi8_mask(v, v) != 0 {
                let hit = _mm512_test_epi8_mask(v, reached);
                if hit != 0 {
                    _mm512_storeu_si512(held.as_mut_ptr() as *mut __m512i, v);
                }
                _mm512_storeu_si512(p.add(i) as *mut __m512i, zero);
                if n + 64 <= ids.len() {
                    n = push_pair_hits_avx512(hit, &held, i, shift, base, ids, masks, n);
                } else {
                    n = push_pair_hits(hit, &held, i, shift, base, ids, masks, n);
                }
            }
            i += 64;
        }
        collect_pairs_scalar(counts, shift, base, ids, masks, i, n)
    }

    /// [`push_pair_hits`] with no branch per hit: each quarter of the 64
    /// counters is compressed to its hits, keys and heads at once (the hits
    /// are too many and too scattered for a predictable loop). Safety:
    /// AVX-512F/BW; `n + 64 <= ids.len() == masks.len()`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn push_pair_hits_avx512(
        hit: u64,
        held: &[u8; 64],
        at: usize,
        shift: u32,
        base: u32,
        ids: &mut [u32],
        masks: &mut [u8],
        mut n: usize,
    ) -> usize {
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let shift = _mm_cvtsi32_si128(shift as i32);
        for q in 0..4 {
            let m = (hit >> (16 * q)) as u16;
            let c =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(held.as_ptr().add(16 * q) as *const __m128i));
            // Bits 2h (after the shift) to bit h, as `gather_heads` does.
            let x = _mm512_and_si512(_mm512_srl_epi32(c, shift), _mm512_set1_epi32(0x55));
            let x = _mm512_and_si512(
                _mm512_or_si512(x, _mm512_srli_epi32::<1>(x)),
                _mm512_set1_epi32(0x33),
            );
            let x = _mm512_and_si512(
                _mm512_or_si512(x, _mm512_srli_epi32::<2>(x)),
                _mm512_set1_epi32(0x0F),
            );
            let first = base.wrapping_add((at + 16 * q) as u32);
            let key = _mm512_add_epi32(iota, _mm512_set1_epi32(first as i32));
            _mm512_storeu_si512(
                ids.as_mut_ptr().add(n) as *mut __m512i,
                _mm512_maskz_compress_epi32(m, key),
            );
            _mm_storeu_si128(
                masks.as_mut_ptr().add(n) as *mut __m128i,
                _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(m, x)),
            );
            n += m.count_ones() as usize;
        }
        n
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn collect_pairs_avx2(
        counts: &mut [u8],
        shift: u32,
        base: u32,
        ids: &mut [u32],
        masks: &mut [u8],
    ) -> usize {
        let len = counts.len();
        let p = counts.as_mut_ptr();
        let reached = _mm256_set1_epi8((0x55u8 << shift) as i8);
        let zero = _mm256_setzero_si256();
        let mut n = 0;
        let mut i = 0;
        let mut held = [0u8; 32];
        while i + 32 <= len {
            let v = _mm256_loadu_si256(p.add(i) as *const __m256i);
            if _mm256_testz_si256(v, v) == 0 {
                let none = _mm256_cmpeq_epi8(_mm256_and_si256(v, reached), zero);
                let hit = !(_mm256_movemask_epi8(none) as u32);
                if hit != 0 {
                    _mm256_storeu_si256(held.as_mut_ptr() as *mut __m256i, v);
                }
                _mm256_storeu_si256(p.add(i) as *mut __m256i, zero);
                n = push_pair_hits(u64::from(hit), &held, i, shift, base, ids, masks, n);
            }
            i += 32;
        }
        collect_pairs_scalar(counts, shift, base, ids, masks, i, n)
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn collect_avx512(counts: &[u8], t: u8, base: u32, out: &mut [u32]) -> usize {
        let tv = _mm512_set1_epi8(t as i8);
        let mut n = 0;
        let mut i = 0;
        let cap = out.len();
        while i + 64 <= counts.len() {
            let v = _mm512_loadu_si512(counts.as_ptr().add(i) as *const __m512i);
            let mut m = _mm512_cmpge_epu8_mask(v, tv);
            while m != 0 {
                if n == cap {
                    return n;
                }
                *out.get_unchecked_mut(n) = base + (i as u32) + m.trailing_zeros();
                n += 1;
                m &= m - 1;
            }
            i += 64;
        }
        collect_scalar(counts, t, base, out, i, n)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn collect_avx2(counts: &[u8], t: u8, base: u32, out: &mut [u32]) -> usize {
        // c >= t  <=>  max(c, t) == c (unsigned).
        let tv = _mm256_set1_epi8(t as i8);
        let mut n = 0;
        let mut i = 0;
        let cap = out.len();
        while i + 32 <= counts.len() {
            let v = _mm256_loadu_si256(counts.as_ptr().add(i) as *const __m256i);
            let ge = _mm256_cmpeq_epi8(_mm256_max_epu8(v, tv), v);
            let mut m = _mm256_movemask_epi8(ge) as u32;
            while m != 0 {
                if n == cap {
                    return n;
                }
                *out.get_unchecked_mut(n) = base + (i as u32) + m.trailing_zeros();
                n += 1;
                m &= m - 1;
            }
            i += 32;
        }
        collect_scalar(counts, t, base, out, i, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::SplitMix64 as Rng;

    #[test]
    fn pair_counters_count_to_two_and_collect_like_the_scalar_reference() {
        let mut rng = Rng(12);
        for &n in &[1usize, 31, 64, 65, 200, 1000, 4099] {
            // Random hits of up to 4 heads; the reference counts exactly.
            let mut exact = vec![[0u32; 4]; n];
            let mut pairs = vec![0u8; n];
            for _ in 0..n * 3 {
                let i = (rng.next_u64() % n as u64) as usize;
                let heads = (rng.next_u64() % 16) as u8;
                pairs[i] = pair_count(pairs[i], heads);
                for (h, c) in exact[i].iter_mut().enumerate() {
                    *c += u32::from(heads >> h & 1);
                }
            }
            for t in [1u8, 2] {
                let mut want = (Vec::new(), Vec::new());
                for (i, c) in exact.iter().enumerate() {
                    let m = (0..4).fold(0u8, |m, h| m | u8::from(c[h] >= u32::from(t)) << h);
                    if m != 0 {
                        want.0.push(7 + i as u32);
                        want.1.push(m);
                    }
                }
                for isa in Isa::all_supported() {
                    let mut counts = pairs.clone();
                    let (mut ids, mut masks) = (vec![0u32; n], vec![0u8; n]);
                    let m = collect_pairs_with(isa, &mut counts, t, 7, &mut ids, &mut masks);
                    assert_eq!(
                        (&ids[..m], &masks[..m]),
                        (&want.0[..], &want.1[..]),
                        "{isa:?} n={n} t={t}"
                    );
                    assert!(counts.iter().all(|&c| c == 0), "{isa:?}: counters cleared");
                    // A short output keeps the first keys and still clears everything.
                    let mut counts = pairs.clone();
                    let cap = m / 2;
                    let (mut ids, mut masks) = (vec![0u32; cap], vec![0u8; cap]);
                    let k = collect_pairs_with(isa, &mut counts, t, 7, &mut ids, &mut masks);
                    assert_eq!(&ids[..k], &want.0[..cap], "{isa:?}");
                    assert!(counts.iter().all(|&c| c == 0));
                }
            }
        }
    }

    #[test]
    fn sign_bits_match_f64_reference_and_agree_across_isas() {
        let mut rng = Rng(7);
        // Up to 8 rows read the planes as bf16, more as f32: both are checked.
        for &(dim, planes, n) in &[
            (1usize, 1usize, 1usize),
            (7, 33, 13),
            (64, 150, 70),
            (128, 97, 9),
            (128, 1500, 4),
            (33, 70, 7),
        ] {
            let pl: Vec<f32> = (0..dim * planes).map(|_| rng.signed_f32()).collect();
            let xs: Vec<f32> = (0..dim * n).map(|_| rng.signed_f32()).collect();
            let p = Projector::new(dim, planes, &pl).expect("shape");
            let w = p.words_per_vector();
            let mut first: Option<Vec<u64>> = None;
            for isa in Isa::all_supported() {
                let mut out = vec![!0u64; n * w];
                p.sign_bits_with(isa, &xs, &mut out);
                for i in 0..n {
                    for j in 0..w * 64 {
                        let bit = out[i * w + j / 64] >> (j % 64) & 1;
                        if j >= planes {
                            assert_eq!(bit, 0);
                            continue;
                        }
                        // The projector keeps its planes in bf16.
                        let r: f64 = (0..dim)
                            .map(|k| {
                                let plane = half::bf16::from_f32(pl[j * dim + k]).to_f64();
                                xs[i * dim + k] as f64 * plane
                            })
                            .sum();
                        if r.abs() > 1e-4 {
                            assert_eq!(bit == 1, r > 0.0, "{isa:?} dim={dim} i={i} j={j}");
                        }
                    }
                }
                match &first {
                    None => first = Some(out),
                    Some(f) => assert_eq!(f, &out, "{isa:?} differs from scalar"),
                }
            }
        }
        assert!(Projector::new(3, 2, &[0.0; 5]).is_err());
        assert!(Projector::new(0, 2, &[]).is_err());
    }

    #[test]
    fn table_codes_cut_the_right_bits() {
        let mut rng = Rng(9);
        let bits: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        for k in 1..=16usize {
            for table in 0..(5 * 64 / k) {
                let mut want = 0u16;
                for b in 0..k {
                    let j = table * k + b;
                    want |= ((bits[j / 64] >> (j % 64) & 1) as u16) << b;
                }
                assert_eq!(table_code(&bits, table, k), want, "k={k} table={table}");
            }
        }
        assert_eq!(table_code(&bits, 1000, 10), 0);
    }

    #[test]
    fn count_equal_and_collect_lanes_match_scalar_for_every_isa() {
        let mut rng = Rng(12);
        for &n in &[0usize, 1, 15, 16, 17, 31, 33, 150, 301, 1000] {
            let a: Vec<u16> = (0..n).map(|_| (rng.next_u64() % 3) as u16).collect();
            let b: Vec<u16> = (0..n).map(|_| (rng.next_u64() % 3) as u16).collect();
            let want = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            for isa in Isa::all_supported() {
                assert_eq!(count_equal_u16_with(isa, &a, &b), want, "{isa:?} n={n}");
            }
            for lanes in [Lanes::U8x4, Lanes::U16x2] {
                let (nl, bits) = (lanes.count(), lanes.bits());
                let counts: Vec<u32> = (0..n)
                    .map(|_| {
                        let mut v = 0u32;
                        for h in 0..nl {
                            let c = if rng.next_u64().is_multiple_of(4) {
                                rng.next_u64() % 300
                            } else {
                                rng.next_u64() % 3
                            };
                            let c = c.min((1u64 << bits) - 1) as u32;
                            v |= c << (bits * h as u32);
                        }
                        v
                    })
                    .collect();
                for t in [0u16, 1, 2, 3, 200, 256, 299] {
                    let mut want = Vec::new();
                    for (i, &v) in counts.iter().enumerate() {
                        let mut m = 0u8;
                        for h in 0..nl {
                            if (v >> (bits * h as u32)) & ((1 << bits) - 1) >= u32::from(t.max(1)) {
                                m |= 1 << h;
                            }
                        }
                        if m != 0 {
                            want.push((i as u32 + 5, m));
                        }
                    }
                    for isa in Isa::all_supported() {
                        for cap in [n, want.len() / 2] {
                            let mut c = counts.clone();
                            let mut ids = vec![0u32; cap];
                            let mut masks = vec![0u8; cap];
                            let k =
                                collect_lanes_with(isa, &mut c, lanes, t, 5, &mut ids, &mut masks);
                            let got: Vec<(u32, u8)> = ids[..k]
                                .iter()
                                .copied()
                                .zip(masks[..k].iter().copied())
                                .collect();
                            assert_eq!(
                                &got[..],
                                &want[..k.min(want.len())],
                                "{isa:?} n={n} t={t} {lanes:?}"
                            );
                            assert_eq!(k, want.len().min(cap));
                            assert!(c.iter().all(|&x| x == 0), "{isa:?} zeroed");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn collect_matches_scalar_for_every_isa() {
        let mut rng = Rng(11);
        for &n in &[0usize, 1, 31, 63, 64, 65, 200, 1001] {
            let counts: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 5) as u8).collect();
            for t in [0u8, 1, 2, 4, 5] {
                let want: Vec<u32> = (0..n as u32)
                    .filter(|&i| counts[i as usize] >= t)
                    .map(|i| i + 3)
                    .collect();
                for isa in Isa::all_supported() {
                    let mut out = vec![0u32; n];
                    let m = collect_at_least_with(isa, &counts, t, 3, &mut out);
                    assert_eq!(&out[..m], &want[..], "{isa:?} n={n} t={t}");
                    let cap = want.len() / 2;
                    let mut small = vec![0u32; cap];
                    let m = collect_at_least_with(isa, &counts, t, 3, &mut small);
                    assert_eq!(&small[..m], &want[..cap]);
                }
            }
        }
    }
}
