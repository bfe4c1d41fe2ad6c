//! Vector kernels for attention: dot products, weighted sums (axpy) and a fast
//! `exp`, for f32 and bf16 rows, with AVX-512, AVX2+FMA and scalar paths.
//!
//! Every kernel is public in an auto-dispatch form that uses [`Isa::detect`],
//! and has a crate-private explicit-ISA form (`*_with`) that the unit tests use
//! to check each SIMD path against the scalar reference. Asking for an ISA the
//! CPU lacks is safe: the request is capped at the best supported level, so no
//! illegal instruction can run.
//!
//! bf16 values are widened to f32 exactly (a 16-bit shift), so bf16 kernels
//! differ from the f32 kernels on the widened data only by summation order.

use crate::Isa;
use half::bf16;

use crate::isa::effective;

/// The ISA the auto-dispatch kernels use (detected once).
#[inline]
fn auto() -> Isa {
    Isa::detect()
}

// ---------------------------------------------------------------------------
// Fast exp
// ---------------------------------------------------------------------------

/// Largest input [`exp_f32`] evaluates; larger inputs saturate to `exp(88)`.
pub const EXP_MAX_INPUT: f32 = 88.0;
/// Inputs below this give exactly 0 (the true value is below 1.2e-38).
pub const EXP_MIN_INPUT: f32 = -87.33;
/// Stated accuracy of [`exp_f32`] and [`exp_inplace`]: relative error at most
/// this for inputs in `[EXP_MIN_INPUT, EXP_MAX_INPUT]` (checked by tests against
/// f64 `exp`).
pub const EXP_MAX_REL_ERROR: f32 = 1e-6;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;

/// Fast scalar `exp` (Cephes-style range reduction and a degree-6 polynomial).
///
/// Always finite: `-inf` and anything below [`EXP_MIN_INPUT`] give 0, anything
/// above [`EXP_MAX_INPUT`] (including `+inf`) gives `exp(88)`. NaN gives 0.
/// Relative error is at most [`EXP_MAX_REL_ERROR`] in range.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN_INPUT {
        return 0.0;
    }
    let x = x.min(EXP_MAX_INPUT);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * scale
}

/// Replaces every element `x` of `xs` with `exp_f32(x)` (auto-dispatch).
pub fn exp_inplace(xs: &mut [f32]) {
    exp_inplace_with(auto(), xs)
}

/// [`exp_inplace`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn exp_inplace_with(isa: Isa, xs: &mut [f32]) {
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX-512F.
        Isa::Avx512 => unsafe { x86::exp_inplace_avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::exp_inplace_avx2(xs) },
        _ => xs.iter_mut().for_each(|x| *x = exp_f32(*x)),
    }
}

/// `xs` folded with `f` from `init` in 16 independent lanes (which the
/// compiler keeps in vector registers), then across them: a sum or a maximum
/// at vector speed for an `f` that is associative and commutative.
pub fn fold_lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = f(*a, x);
        }
    }
    let acc = rest.iter().fold(acc, |mut acc, &x| {
        acc[0] = f(acc[0], x);
        acc
    });
    acc.into_iter().fold(init, f)
}

/// Replaces every `x` of `xs` with `exp_f32(x - shift)` and returns the sum
/// of the results: a softmax's weights relative to its largest score
/// (`shift`) and their sum, in one pass over the scores (auto-dispatch).
pub fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_with(auto(), xs, shift)
}

/// [`exp_shifted_sum`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn exp_shifted_sum_with(isa: Isa, xs: &mut [f32], shift: f32) -> f32 {
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX-512F.
        Isa::Avx512 => unsafe { x86::exp_shifted_sum_avx512(xs, shift) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::exp_shifted_sum_avx2(xs, shift) },
        _ => xs.iter_mut().fold(0.0, |sum, x| {
            *x = exp_f32(*x - shift);
            sum + *x
        }),
    }
}

// ---------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------

/// `sum a[i] * b[i]` over `min(a.len(), b.len())` elements (auto-dispatch).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_with(auto(), a, b)
}

/// [`dot_f32`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dot_f32_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; slices have equal length.
        Isa::Avx512 => unsafe { x86::dot_f32_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; slices have equal length.
        Isa::Avx2 => unsafe { x86::dot_f32_avx2(a, b) },
        _ => dot_f32_scalar(a, b),
    }
}

fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `sum row[i] * q[i]` for a bf16 row and an f32 vector, over
/// `min(row.len(), q.len())` elements (auto-dispatch).
pub fn dot_bf16_f32(row: &[bf16], q: &[f32]) -> f32 {
    dot_bf16_f32_with(auto(), row, q)
}

/// [`dot_bf16_f32`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dot_bf16_f32_with(isa: Isa, row: &[bf16], q: &[f32]) -> f32 {
    let n = row.len().min(q.len());
    let (row, q) = (&row[..n], &q[..n]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; slices have equal length.
        Isa::Avx512 => unsafe { x86::dot_bf16_avx512(row, q) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; slices have equal length.
        Isa::Avx2 => unsafe { x86::dot_bf16_avx2(row, q) },
        _ => dot_bf16_scalar(row, q),
    }
}

fn dot_bf16_scalar(row: &[bf16], q: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut cr = row.chunks_exact(8);
    let mut cq = q.chunks_exact(8);
    for (x, y) in (&mut cr).zip(&mut cq) {
        for i in 0..8 {
            acc[i] = x[i].to_f32().mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in cr.remainder().iter().zip(cq.remainder()) {
        s = x.to_f32().mul_add(*y, s);
    }
    s
}

// ---------------------------------------------------------------------------
// Weighted sums
// ---------------------------------------------------------------------------

/// `out[i] += w * row[i]` over `min(out.len(), row.len())` elements (auto-dispatch).
pub fn axpy_f32(out: &mut [f32], w: f32, row: &[f32]) {
    axpy_f32_with(auto(), out, w, row)
}

/// [`axpy_f32`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_f32_with(isa: Isa, out: &mut [f32], w: f32, row: &[f32]) {
    let n = out.len().min(row.len());
    let (out, row) = (&mut out[..n], &row[..n]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; slices have equal length.
        Isa::Avx512 => unsafe { x86::axpy_f32_avx512(out, w, row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; slices have equal length.
        Isa::Avx2 => unsafe { x86::axpy_f32_avx2(out, w, row) },
        _ => out
            .iter_mut()
            .zip(row)
            .for_each(|(o, r)| *o = w.mul_add(*r, *o)),
    }
}

/// `out[i] += w * row[i]` for a bf16 row, over `min(out.len(), row.len())`
/// elements (auto-dispatch).
pub fn axpy_bf16(out: &mut [f32], w: f32, row: &[bf16]) {
    axpy_bf16_with(auto(), out, w, row)
}

/// [`axpy_bf16`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_bf16_with(isa: Isa, out: &mut [f32], w: f32, row: &[bf16]) {
    let n = out.len().min(row.len());
    let (out, row) = (&mut out[..n], &row[..n]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; slices have equal length.
        Isa::Avx512 => unsafe { x86::axpy_bf16_avx512(out, w, row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; slices have equal length.
        Isa::Avx2 => unsafe { x86::axpy_bf16_avx2(out, w, row) },
        _ => out
            .iter_mut()
            .zip(row)
            .for_each(|(o, r)| *o = w.mul_add(r.to_f32(), *o)),
    }
}

/// Dot products of one bf16 row with several f32 vectors at once (the query
/// heads of a GQA group): `out[h] = sum_i row[i] * queries[h * row.len() + i]`
/// for `h < out.len()`. The row is read (and widened) once. `out.len()` must
/// be at most 8 and `queries.len() >= out.len() * row.len()`; otherwise only
/// the heads that fit are computed and the rest of `out` is set to 0.
/// Each result equals [`dot_bf16_f32`] of the same inputs up to summation order.
pub fn dot_bf16_f32_multi(row: &[bf16], queries: &[f32], out: &mut [f32]) {
    dot_bf16_f32_multi_with(auto(), row, queries, out)
}

/// [`dot_bf16_f32_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dot_bf16_f32_multi_with(isa: Isa, row: &[bf16], queries: &[f32], out: &mut [f32]) {
    let d = row.len();
    let g = multi_heads(d, queries.len(), out);
    let (queries, out) = (&queries[..g * d], &mut out[..g]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; `queries` holds `g * d` values, g <= 8.
        Isa::Avx512 => unsafe { x86::dot_multi_bf16_avx512(row, queries, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `queries` holds `g * d` values, g <= 8.
        Isa::Avx2 => unsafe { x86::dot_multi_bf16_avx2(row, queries, out) },
        _ => {
            for (h, o) in out.iter_mut().enumerate() {
                *o = dot_bf16_scalar(row, &queries[h * d..(h + 1) * d]);
            }
        }
    }
}

/// [`dot_bf16_f32_multi`] for an f32 row.
pub fn dot_f32_multi(row: &[f32], queries: &[f32], out: &mut [f32]) {
    dot_f32_multi_with(auto(), row, queries, out)
}

/// [`dot_f32_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dot_f32_multi_with(isa: Isa, row: &[f32], queries: &[f32], out: &mut [f32]) {
    let d = row.len();
    let g = multi_heads(d, queries.len(), out);
    let (queries, out) = (&queries[..g * d], &mut out[..g]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; `queries` holds `g * d` values, g <= 8.
        Isa::Avx512 => unsafe { x86::dot_multi_f32_avx512(row, queries, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `queries` holds `g * d` values, g <= 8.
        Isa::Avx2 => unsafe { x86::dot_multi_f32_avx2(row, queries, out) },
        _ => {
            for (h, o) in out.iter_mut().enumerate() {
                *o = dot_f32_scalar(row, &queries[h * d..(h + 1) * d]);
            }
        }
    }
}

/// How many heads of a multi kernel fit: at most 8, at most `out.len()`, and
/// at most `q_len / d`. Zeroes the `out` entries past that.
fn multi_heads(d: usize, q_len: usize, out: &mut [f32]) -> usize {
    let fit = q_len.checked_div(d).unwrap_or(out.len());
    let g = out.len().min(8).min(fit);
    out[g..].iter_mut().for_each(|x| *x = 0.0);
    g
}

/// Head dimension up to which [`dot_rows_bf16`]'s AVX-512 path keeps its
/// rearranged queries on the stack; longer rows take the per-row path.
const ROWS_MAX_D: usize = 256;

/// Dot products of scattered bf16 rows with the query head each is paired with,
/// for the keys a step gathers from a store: `out[p] = row(ids[p]) ·
/// queries[heads[p] * d..][..d]`, where `d` is the length of every row and
/// `queries` holds `queries.len() / d` heads. The rows `ahead` pairs ahead of
/// the one being computed are prefetched (scattered rows come from memory).
///
/// With `centred = Some((mean, norms))`, also `norms[p] = |row(ids[p]) -
/// mean|`, from the row already loaded for the dot product: a step that
/// needs the centred norm of each key then reads no other memory for it.
///
/// With AVX-512 and `d` a multiple of 32 (up to 256) the pairs go in blocks of
/// 16 with one transposed reduction, a few instructions per pair where a dot
/// product of its own needs a horizontal sum. Each result equals
/// [`dot_bf16_f32`] of the same inputs up to summation order.
///
/// # Panics
/// If `ids`, `heads`, `out` (and `norms`) differ in length, a row's length
/// differs from the first's or from `mean`'s, or a head has no query
/// (`(heads[p] + 1) * d > queries.len()`).
pub fn dot_rows_bf16<'a>(
    ids: &[u32],
    row: impl Fn(u32) -> &'a [bf16],
    heads: &[u8],
    queries: &[f32],
    ahead: usize,
    out: &mut [f32],
    centred: Option<(&[f32], &mut [f32])>,
) {
    dot_rows_bf16_with(auto(), ids, row, heads, queries, ahead, out, centred)
}

/// [`dot_rows_bf16`] with an explicit ISA (capped at what the CPU supports).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows_bf16_with<'a>(
    isa: Isa,
    ids: &[u32],
    row: impl Fn(u32) -> &'a [bf16],
    heads: &[u8],
    queries: &[f32],
    ahead: usize,
    out: &mut [f32],
    centred: Option<(&[f32], &mut [f32])>,
) {
    let Some((d, row)) = checked_rows("dot_rows_bf16", ids, row, heads, out.len(), queries.len())
    else {
        return;
    };
    let g = queries.len().checked_div(d).unwrap_or(0);
    if let Some((mean, norms)) = &centred {
        assert!(
            mean.len() == d && norms.len() == ids.len(),
            "dot_rows_bf16: a mean of {} for rows of {d}, {} norms for {} ids",
            mean.len(),
            norms.len(),
            ids.len()
        );
    }
    let query = |h: u8| &queries[usize::from(h) * d..(usize::from(h) + 1) * d];
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if d.is_multiple_of(32) && d <= ROWS_MAX_D && g <= 8 => {
            // SAFETY: the CPU supports AVX-512F/BW; every row (and the mean)
            // has `d` values, d is a multiple of 32 up to ROWS_MAX_D, every
            // head < g <= 8 has `d` query values, and `norms` has a slot per id.
            unsafe {
                match centred {
                    Some((mean, norms)) => x86::dot_rows_bf16_avx512::<true>(
                        ids, row, heads, queries, mean, d, ahead, out, norms,
                    ),
                    None => x86::dot_rows_bf16_avx512::<false>(
                        ids,
                        row,
                        heads,
                        queries,
                        &[],
                        d,
                        ahead,
                        out,
                        &mut [],
                    ),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if d.is_multiple_of(8) => {
            // SAFETY: the CPU supports AVX2 and FMA; every row (and the mean)
            // has `d` values, d is a multiple of 8, every head has `d` query
            // values, and `norms` has a slot per id.
            unsafe {
                match centred {
                    Some((mean, norms)) => x86::dot_rows_bf16_avx2::<true>(
                        ids, row, heads, queries, mean, ahead, out, norms,
                    ),
                    None => x86::dot_rows_bf16_avx2::<false>(
                        ids,
                        row,
                        heads,
                        queries,
                        &[],
                        ahead,
                        out,
                        &mut [],
                    ),
                }
            }
        }
        level => {
            for (p, ((&i, &h), o)) in ids.iter().zip(heads).zip(out.iter_mut()).enumerate() {
                if let Some(&next) = ids.get(p + ahead) {
                    prefetch(row(next));
                }
                *o = dot_bf16_f32_with(level, row(i), query(h));
            }
            if let Some((mean, norms)) = centred {
                for (&i, n) in ids.iter().zip(norms.iter_mut()) {
                    let s: f32 = row(i)
                        .iter()
                        .zip(mean)
                        .map(|(k, m)| (k.to_f32() - m) * (k.to_f32() - m))
                        .sum();
                    *n = s.sqrt();
                }
            }
        }
    }
}

/// The argument checks of the gathered-row kernels ([`dot_rows_bf16`],
/// [`crate::int8::dot_rows_i8`], [`crate::int8::axpy_rows_i8`]), named
/// `kernel` in their messages: `ids`, `heads` and the kernel's `per_pair`
/// values have one entry per pair, and every head's `d` values (`d` is the
/// first row's length) lie within its `per_head` values. Returns `d` and `row`
/// checked to give `d` values for every id, so that the kernels may read `d`
/// values of any row; `None` when there are no pairs.
pub(crate) fn checked_rows<'a, T: 'a>(
    kernel: &'static str,
    ids: &[u32],
    row: impl Fn(u32) -> &'a [T],
    heads: &[u8],
    per_pair: usize,
    per_head: usize,
) -> Option<(usize, impl Fn(u32) -> &'a [T])> {
    assert!(
        ids.len() == heads.len() && ids.len() == per_pair,
        "{kernel}: {} ids, {} heads, {per_pair} values per pair",
        ids.len(),
        heads.len(),
    );
    let d = row(*ids.first()?).len();
    if let Some(&h) = heads.iter().max() {
        assert!(
            (usize::from(h) + 1) * d <= per_head,
            "{kernel}: head {h} has no {d} values among {per_head}"
        );
    }
    Some((d, move |i: u32| -> &'a [T] {
        let r = row(i);
        assert_eq!(r.len(), d, "{kernel}: rows of unequal length");
        r
    }))
}

/// Turns the dot products of (key, head) pairs into logits corrected by a
/// tabulated function of their cosine, as importance-weighted sampling needs:
/// for pair `p` with head `h = heads[p]` and key norm `k = key_norms[p]`,
/// `cos = (dots[p] - offsets[h]) / (norms[h] * k)` (0 when the denominator is
/// not positive) and `dots[p]` becomes `dots[p] * scale - f(cos)`, where `f`
/// interpolates `table` linearly, its entries at equal steps over [-1, 1]
/// (`cos` clamped to that range).
///
/// # Panics
/// If `dots`, `heads` and `key_norms` differ in length, `table` has fewer
/// than two entries or a head is 8 or more.
#[allow(clippy::too_many_arguments)]
pub fn corrected_logits(
    dots: &mut [f32],
    heads: &[u8],
    key_norms: &[f32],
    offsets: &[f32; 8],
    norms: &[f32; 8],
    scale: f32,
    table: &[f32],
) {
    corrected_logits_with(auto(), dots, heads, key_norms, offsets, norms, scale, table)
}

/// [`corrected_logits`] with an explicit ISA (capped at what the CPU
/// supports; AVX2 takes the scalar path).
#[allow(clippy::too_many_arguments)]
pub(crate) fn corrected_logits_with(
    isa: Isa,
    dots: &mut [f32],
    heads: &[u8],
    key_norms: &[f32],
    offsets: &[f32; 8],
    norms: &[f32; 8],
    scale: f32,
    table: &[f32],
) {
    assert!(
        dots.len() == heads.len() && dots.len() == key_norms.len(),
        "corrected_logits: {} dots, {} heads, {} key norms",
        dots.len(),
        heads.len(),
        key_norms.len()
    );
    assert!(
        table.len() >= 2,
        "corrected_logits: a table of {} entries",
        table.len()
    );
    assert!(
        heads.iter().all(|&h| h < 8),
        "corrected_logits: a head of 8 or more"
    );
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; lengths and heads were checked
        // above, and the table has at least two entries.
        Isa::Avx512 => unsafe {
            x86::corrected_logits_avx512(dots, heads, key_norms, offsets, norms, scale, table)
        },
        _ => {
            let steps = (table.len() - 1) as f32;
            for ((x, &h), &k) in dots.iter_mut().zip(heads).zip(key_norms) {
                let h = usize::from(h);
                let den = norms[h] * k;
                let cos = if den > 0.0 {
                    (*x - offsets[h]) / den
                } else {
                    0.0
                };
                let pos = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * steps;
                let i = (pos as usize).min(table.len() - 2);
                let f = pos - i as f32;
                *x = *x * scale - (table[i] + f * (table[i + 1] - table[i]));
            }
        }
    }
}

/// Weighted sums into several outputs at once: `outs[h * row.len() + i] +=
/// ws[h] * row[i]` for `h < ws.len()` (at most 8). The row is read (and
/// widened) once. Heads whose output does not fit in `outs` are skipped.
pub fn axpy_bf16_multi(outs: &mut [f32], ws: &[f32], row: &[bf16]) {
    axpy_bf16_multi_with(auto(), outs, ws, row)
}

/// [`axpy_bf16_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_bf16_multi_with(isa: Isa, outs: &mut [f32], ws: &[f32], row: &[bf16]) {
    let d = row.len();
    let g = ws.len().min(8).min(outs.len().checked_div(d).unwrap_or(0));
    let (outs, ws) = (&mut outs[..g * d], &ws[..g]);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; `outs` holds `g * d` values, g <= 8.
        Isa::Avx512 => unsafe { x86::axpy_multi_bf16_avx512(outs, ws, row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `outs` holds `g * d` values, g <= 8.
        Isa::Avx2 => unsafe { x86::axpy_multi_bf16_avx2(outs, ws, row) },
        _ => {
            for (o, w) in outs.chunks_exact_mut(d.max(1)).zip(ws) {
                o.iter_mut()
                    .zip(row)
                    .for_each(|(o, r)| *o = w.mul_add(r.to_f32(), *o));
            }
        }
    }
}

/// [`axpy_bf16_multi`] for an f32 row.
pub fn axpy_f32_multi(outs: &mut [f32], ws: &[f32], row: &[f32]) {
    axpy_f32_multi_with(auto(), outs, ws, row)
}

/// [`axpy_f32_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_f32_multi_with(isa: Isa, outs: &mut [f32], ws: &[f32], row: &[f32]) {
    let d = row.len();
    let g = ws.len().min(8).min(outs.len().checked_div(d).unwrap_or(0));
    let (outs, ws) = (&mut outs[..g * d], &ws[..g]);
    for (o, w) in outs.chunks_exact_mut(d.max(1)).zip(ws) {
        axpy_f32_with(isa, o, *w, row);
    }
}

/// Reads one byte of every cache line of `bytes` and returns their xor (to be
/// kept, e.g. by `std::hint::black_box`): plain loads, which unlike
/// prefetches are never dropped and keep many misses in flight.
#[inline(always)]
pub fn touch_lines(bytes: &[u8]) -> u8 {
    let base = bytes.as_ptr() as usize;
    let (mut x, mut i) = (0, 0);
    while let Some(&b) = bytes.get(i) {
        x ^= b;
        // On to the first byte of the next line.
        i += 64 - (base + i) % 64;
    }
    x
}

/// Hints the CPU to fetch every cache line of `s` (a no-op where unsupported).
#[inline]
pub fn prefetch<T>(s: &[T]) {
    prefetch_bytes(s.as_ptr() as *const u8, std::mem::size_of_val(s));
}

/// Hints the CPU to fetch the cache lines of `bytes` bytes from `p`, which
/// need not point into live memory: a prefetch never faults and reads
/// nothing the program sees.
#[inline(always)]
pub(crate) fn prefetch_bytes(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch never faults; the address is only computed
            // (wrapping), never dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Hints the CPU to fetch the cache line holding `s[i]` (nothing if `i` is out
/// of range).
#[inline]
pub fn prefetch_at<T>(s: &[T], i: usize) {
    if let Some(x) = s.get(i) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetch never faults; the pointer is to a live element.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(x as *const T as *const i8)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = x;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use half::bf16;
    use std::arch::x86_64::*;

    // ----- AVX-512 -----

    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let valid = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN_INPUT));
        let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX_INPUT));
        let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN_INPUT));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
            _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_maskz_mul_ps(valid, y, _mm512_castsi512_ps(e))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_inplace_avx512(xs: &mut [f32]) {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(p.add(i), exp16(_mm512_loadu_ps(p.add(i))));
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, exp16(v));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_sum_avx512(xs: &mut [f32], shift: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let by = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let w = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), by));
            _mm512_storeu_ps(p.add(i), w);
            sum = _mm512_add_ps(sum, w);
            i += 16;
        }
        if i < n {
            let m = tail_mask16(n - i);
            let w = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), by));
            _mm512_mask_storeu_ps(p.add(i), m, w);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, w));
        }
        _mm512_reduce_add_ps(sum)
    }

    #[inline]
    fn tail_mask16(rem: usize) -> __mmask16 {
        ((1u32 << rem) - 1) as u16
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                acc1,
            );
            i += 32;
        }
        while i < n {
            let m = tail_mask16((n - i).min(16));
            acc0 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc0,
            );
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// Widens 16 bf16 values (as u16 lanes) to f32 by a 16-bit shift.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn widen16(v: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dot_bf16_avx512(row: &[bf16], q: &[f32]) -> f32 {
        let n = row.len();
        let pr = row.as_ptr() as *const u16;
        let pq = q.as_ptr();
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            let k0 = widen16(_mm256_loadu_si256(pr.add(i) as *const __m256i));
            let k1 = widen16(_mm256_loadu_si256(pr.add(i + 16) as *const __m256i));
            acc0 = _mm512_fmadd_ps(k0, _mm512_loadu_ps(pq.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(k1, _mm512_loadu_ps(pq.add(i + 16)), acc1);
            i += 32;
        }
        while i < n {
            let m = tail_mask16((n - i).min(16));
            let k = widen16(_mm256_maskz_loadu_epi16(m, pr.add(i) as *const i16));
            acc0 = _mm512_fmadd_ps(k, _mm512_maskz_loadu_ps(m, pq.add(i)), acc0);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// # Safety
    /// AVX-512F; `dots`, `heads` and `key_norms` of equal length, every head
    /// below 8, `table.len() >= 2`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn corrected_logits_avx512(
        dots: &mut [f32],
        heads: &[u8],
        key_norms: &[f32],
        offsets: &[f32; 8],
        norms: &[f32; 8],
        scale: f32,
        table: &[f32],
    ) {
        let n = dots.len();
        let offsets = _mm512_castps256_ps512(_mm256_loadu_ps(offsets.as_ptr()));
        let norms = _mm512_castps256_ps512(_mm256_loadu_ps(norms.as_ptr()));
        let steps = (table.len() - 1) as f32;
        let last_cell = _mm512_set1_epi32(table.len() as i32 - 2);
        let mut p = 0;
        while p < n {
            let m: __mmask16 = if n - p >= 16 {
                0xFFFF
            } else {
                (1u16 << (n - p)) - 1
            };
            let dot = _mm512_maskz_loadu_ps(m, dots.as_ptr().add(p));
            let h =
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, heads.as_ptr().add(p) as *const i8));
            let knorm = _mm512_maskz_loadu_ps(m, key_norms.as_ptr().add(p));
            let den = _mm512_mul_ps(_mm512_permutexvar_ps(h, norms), knorm);
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(den, _mm512_setzero_ps());
            let centred = _mm512_sub_ps(dot, _mm512_permutexvar_ps(h, offsets));
            let cos = _mm512_maskz_div_ps(positive, centred, den);
            let cos = _mm512_min_ps(
                _mm512_max_ps(cos, _mm512_set1_ps(-1.0)),
                _mm512_set1_ps(1.0),
            );
            let pos = _mm512_mul_ps(
                _mm512_add_ps(cos, _mm512_set1_ps(1.0)),
                _mm512_set1_ps(0.5 * steps),
            );
            let i = _mm512_min_epi32(_mm512_cvttps_epi32(pos), last_cell);
            let f = _mm512_sub_ps(pos, _mm512_cvtepi32_ps(i));
            let v0 = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, i, table.as_ptr());
            let v1 = _mm512_mask_i32gather_ps::<4>(
                _mm512_setzero_ps(),
                m,
                _mm512_add_epi32(i, _mm512_set1_epi32(1)),
                table.as_ptr(),
            );
            let correction = _mm512_fmadd_ps(f, _mm512_sub_ps(v1, v0), v0);
            let logit = _mm512_fmsub_ps(dot, _mm512_set1_ps(scale), correction);
            _mm512_mask_storeu_ps(dots.as_mut_ptr().add(p), m, logit);
            p += 16;
        }
    }

    /// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: four
    /// levels of shuffles and adds, each halving the vectors and doubling the
    /// outputs per vector, then one permutation into order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn reduce16(v: &[__m512; 16]) -> __m512 {
        // Blocks 0-1 hold partials of v[2k], blocks 2-3 of v[2k + 1].
        let s: [__m512; 8] = std::array::from_fn(|k| {
            let (x, y) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        });
        // Block j holds partials of v[4k + j].
        let t: [__m512; 4] = std::array::from_fn(|k| {
            let (a, b) = (s[2 * k], s[2 * k + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // In block j, lanes 0 and 2 hold partials of v[8k + j], 1 and 3 of
        // v[8k + 4 + j].
        let u: [__m512; 2] = std::array::from_fn(|k| {
            let (a, b) = (t[2 * k], t[2 * k + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Lane 4j + k holds the sum of v[4k + j].
        let f = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(u[0], u[1]),
            _mm512_shuffle_ps::<0xEE>(u[0], u[1]),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, f)
    }

    /// # Safety
    /// AVX-512F/BW; every `row(ids[p])` has `d` values, `d % 32 == 0`,
    /// `d <= ROWS_MAX_D`, `queries.len() <= 8 * d` and every head has `d`
    /// query values; with `NORMS`, `mean` has `d` values and `norms` a slot
    /// per id.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_rows_bf16_avx512<'a, const NORMS: bool>(
        ids: &[u32],
        row: impl Fn(u32) -> &'a [bf16],
        heads: &[u8],
        queries: &[f32],
        mean: &[f32],
        d: usize,
        ahead: usize,
        out: &mut [f32],
        norms: &mut [f32],
    ) {
        // A 32-bit lane holds two bf16 values: the low one widens by a shift,
        // the high one by clearing the low half. Each 32-value chunk of the
        // queries (and the mean) is split the same way (even values, then
        // odd), so a chunk costs one load, a shift, an and and two FMAs.
        let split = |src: &[f32], dst: &mut [f32]| {
            for (q, s) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
                for i in 0..16 {
                    s[i] = q[2 * i];
                    s[16 + i] = q[2 * i + 1];
                }
            }
        };
        let mut split_q = [0.0f32; 8 * ROWS_MAX_D];
        split(queries, &mut split_q);
        let mut split_mean = [0.0f32; ROWS_MAX_D];
        if NORMS {
            split(mean, &mut split_mean);
        }
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let n = ids.len();
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut sq = [_mm512_setzero_ps(); 16];
        let mut p0 = 0;
        while p0 < n {
            let m = (n - p0).min(16);
            for (k, (a, s)) in acc.iter_mut().zip(sq.iter_mut()).enumerate() {
                if k >= m {
                    *a = _mm512_setzero_ps();
                    *s = _mm512_setzero_ps();
                    continue;
                }
                let p = p0 + k;
                // Pairs of one row are adjacent (all heads of a key): fetch it once.
                if let Some(&next) = ids.get(p + ahead) {
                    if p + ahead == 0 || ids[p + ahead - 1] != next {
                        prefetch(row(next));
                    }
                }
                let r = row(ids[p]).as_ptr() as *const __m512i;
                let q = split_q.as_ptr().add(usize::from(heads[p]) * d);
                let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let (mut sq_even, mut sq_odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for c in 0..d / 32 {
                    let x = _mm512_loadu_si512(r.add(c));
                    let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x));
                    let hi = _mm512_castsi512_ps(_mm512_and_si512(x, high));
                    even = _mm512_fmadd_ps(lo, _mm512_loadu_ps(q.add(32 * c)), even);
                    odd = _mm512_fmadd_ps(hi, _mm512_loadu_ps(q.add(32 * c + 16)), odd);
                    if NORMS {
                        let mu = split_mean.as_ptr().add(32 * c);
                        let lo = _mm512_sub_ps(lo, _mm512_loadu_ps(mu));
                        let hi = _mm512_sub_ps(hi, _mm512_loadu_ps(mu.add(16)));
                        sq_even = _mm512_fmadd_ps(lo, lo, sq_even);
                        sq_odd = _mm512_fmadd_ps(hi, hi, sq_odd);
                    }
                }
                *a = _mm512_add_ps(even, odd);
                *s = _mm512_add_ps(sq_even, sq_odd);
            }
            let keep = ((1u32 << m) - 1) as u16;
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(p0), keep, reduce16(&acc));
            if NORMS {
                let norm = _mm512_sqrt_ps(reduce16(&sq));
                _mm512_mask_storeu_ps(norms.as_mut_ptr().add(p0), keep, norm);
            }
            p0 += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_f32_avx512(out: &mut [f32], w: f32, row: &[f32]) {
        let n = out.len();
        let (po, pr) = (out.as_mut_ptr(), row.as_ptr());
        let wv = _mm512_set1_ps(w);
        let mut i = 0;
        while i + 16 <= n {
            let o = _mm512_fmadd_ps(wv, _mm512_loadu_ps(pr.add(i)), _mm512_loadu_ps(po.add(i)));
            _mm512_storeu_ps(po.add(i), o);
            i += 16;
        }
        if i < n {
            let m = tail_mask16(n - i);
            let o = _mm512_fmadd_ps(
                wv,
                _mm512_maskz_loadu_ps(m, pr.add(i)),
                _mm512_maskz_loadu_ps(m, po.add(i)),
            );
            _mm512_mask_storeu_ps(po.add(i), m, o);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn axpy_bf16_avx512(out: &mut [f32], w: f32, row: &[bf16]) {
        let n = out.len();
        let po = out.as_mut_ptr();
        let pr = row.as_ptr() as *const u16;
        let wv = _mm512_set1_ps(w);
        let mut i = 0;
        while i + 16 <= n {
            let r = widen16(_mm256_loadu_si256(pr.add(i) as *const __m256i));
            _mm512_storeu_ps(
                po.add(i),
                _mm512_fmadd_ps(wv, r, _mm512_loadu_ps(po.add(i))),
            );
            i += 16;
        }
        if i < n {
            let m = tail_mask16(n - i);
            let r = widen16(_mm256_maskz_loadu_epi16(m, pr.add(i) as *const i16));
            let o = _mm512_fmadd_ps(wv, r, _mm512_maskz_loadu_ps(m, po.add(i)));
            _mm512_mask_storeu_ps(po.add(i), m, o);
        }
    }

    // ----- multi-head kernels -----

    /// Loads up to 16 bf16 (masked past `n - i`) and widens them to f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_bf16x16(p: *const u16, i: usize, n: usize) -> __m512 {
        if i + 16 <= n {
            widen16(_mm256_loadu_si256(p.add(i) as *const __m256i))
        } else {
            let m = tail_mask16(n - i);
            widen16(_mm256_maskz_loadu_epi16(m, p.add(i) as *const i16))
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_f32x16(p: *const f32, i: usize, n: usize) -> __m512 {
        if i + 16 <= n {
            _mm512_loadu_ps(p.add(i))
        } else {
            _mm512_maskz_loadu_ps(tail_mask16(n - i), p.add(i))
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dot_multi_bf16_avx512_g<const G: usize>(row: &[bf16], qs: &[f32], out: &mut [f32]) {
        let d = row.len();
        let pr = row.as_ptr() as *const u16;
        let pq = qs.as_ptr();
        let mut acc0 = [_mm512_setzero_ps(); G];
        let mut acc1 = [_mm512_setzero_ps(); G];
        let mut i = 0;
        while i + 32 <= d {
            let k0 = widen16(_mm256_loadu_si256(pr.add(i) as *const __m256i));
            let k1 = widen16(_mm256_loadu_si256(pr.add(i + 16) as *const __m256i));
            for h in 0..G {
                acc0[h] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(pq.add(h * d + i)), acc0[h]);
                acc1[h] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(pq.add(h * d + i + 16)), acc1[h]);
            }
            i += 32;
        }
        while i < d {
            let k = load_bf16x16(pr, i, d);
            for h in 0..G {
                acc0[h] = _mm512_fmadd_ps(k, load_f32x16(pq.add(h * d), i, d), acc0[h]);
            }
            i += 16;
        }
        for h in 0..G {
            out[h] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[h], acc1[h]));
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dot_multi_bf16_avx512(row: &[bf16], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_bf16_avx512_g, row, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_multi_f32_avx512_g<const G: usize>(row: &[f32], qs: &[f32], out: &mut [f32]) {
        let d = row.len();
        let pr = row.as_ptr();
        let pq = qs.as_ptr();
        let mut acc0 = [_mm512_setzero_ps(); G];
        let mut acc1 = [_mm512_setzero_ps(); G];
        let mut i = 0;
        while i + 32 <= d {
            let k0 = _mm512_loadu_ps(pr.add(i));
            let k1 = _mm512_loadu_ps(pr.add(i + 16));
            for h in 0..G {
                acc0[h] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(pq.add(h * d + i)), acc0[h]);
                acc1[h] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(pq.add(h * d + i + 16)), acc1[h]);
            }
            i += 32;
        }
        while i < d {
            let k = load_f32x16(pr, i, d);
            for h in 0..G {
                acc0[h] = _mm512_fmadd_ps(k, load_f32x16(pq.add(h * d), i, d), acc0[h]);
            }
            i += 16;
        }
        for h in 0..G {
            out[h] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[h], acc1[h]));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_multi_f32_avx512(row: &[f32], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_f32_avx512_g, row, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn axpy_multi_bf16_avx512_g<const G: usize>(outs: &mut [f32], ws: &[f32], row: &[bf16]) {
        let d = row.len();
        let pr = row.as_ptr() as *const u16;
        let po = outs.as_mut_ptr();
        let mut wv = [_mm512_setzero_ps(); G];
        for h in 0..G {
            wv[h] = _mm512_set1_ps(ws[h]);
        }
        let mut i = 0;
        while i + 16 <= d {
            let r = widen16(_mm256_loadu_si256(pr.add(i) as *const __m256i));
            for h in 0..G {
                let p = po.add(h * d + i);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(wv[h], r, _mm512_loadu_ps(p)));
            }
            i += 16;
        }
        if i < d {
            let m = tail_mask16(d - i);
            let r = widen16(_mm256_maskz_loadu_epi16(m, pr.add(i) as *const i16));
            for h in 0..G {
                let p = po.add(h * d + i);
                _mm512_mask_storeu_ps(p, m, _mm512_fmadd_ps(wv[h], r, _mm512_maskz_loadu_ps(m, p)));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn axpy_multi_bf16_avx512(outs: &mut [f32], ws: &[f32], row: &[bf16]) {
        dispatch_g!(ws.len(), axpy_multi_bf16_avx512_g, outs, ws, row)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_multi_bf16_avx2_g<const G: usize>(row: &[bf16], qs: &[f32], out: &mut [f32]) {
        let d = row.len();
        let pr = row.as_ptr() as *const u16;
        let pq = qs.as_ptr();
        let mut acc = [_mm256_setzero_ps(); G];
        let mut i = 0;
        while i + 8 <= d {
            let k = widen8(pr.add(i));
            for h in 0..G {
                acc[h] = _mm256_fmadd_ps(k, _mm256_loadu_ps(pq.add(h * d + i)), acc[h]);
            }
            i += 8;
        }
        for h in 0..G {
            let mut s = hsum8(acc[h]);
            for j in i..d {
                s = row[j].to_f32().mul_add(*pq.add(h * d + j), s);
            }
            out[h] = s;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_multi_bf16_avx2(row: &[bf16], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_bf16_avx2_g, row, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_multi_f32_avx2_g<const G: usize>(row: &[f32], qs: &[f32], out: &mut [f32]) {
        let d = row.len();
        let pr = row.as_ptr();
        let pq = qs.as_ptr();
        let mut acc = [_mm256_setzero_ps(); G];
        let mut i = 0;
        while i + 8 <= d {
            let k = _mm256_loadu_ps(pr.add(i));
            for h in 0..G {
                acc[h] = _mm256_fmadd_ps(k, _mm256_loadu_ps(pq.add(h * d + i)), acc[h]);
            }
            i += 8;
        }
        for h in 0..G {
            let mut s = hsum8(acc[h]);
            for j in i..d {
                s = row[j].mul_add(*pq.add(h * d + j), s);
            }
            out[h] = s;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_multi_f32_avx2(row: &[f32], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_f32_avx2_g, row, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_multi_bf16_avx2_g<const G: usize>(outs: &mut [f32], ws: &[f32], row: &[bf16]) {
        let d = row.len();
        let pr = row.as_ptr() as *const u16;
        let po = outs.as_mut_ptr();
        let mut wv = [_mm256_setzero_ps(); G];
        for h in 0..G {
            wv[h] = _mm256_set1_ps(ws[h]);
        }
        let mut i = 0;
        while i + 8 <= d {
            let r = widen8(pr.add(i));
            for h in 0..G {
                let p = po.add(h * d + i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(wv[h], r, _mm256_loadu_ps(p)));
            }
            i += 8;
        }
        for j in i..d {
            let r = row[j].to_f32();
            for h in 0..G {
                let p = po.add(h * d + j);
                *p = ws[h].mul_add(r, *p);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_multi_bf16_avx2(outs: &mut [f32], ws: &[f32], row: &[bf16]) {
        dispatch_g!(ws.len(), axpy_multi_bf16_avx2_g, outs, ws, row)
    }

    // ----- AVX2 + FMA -----

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let valid = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN_INPUT));
        let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX_INPUT));
        let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN_INPUT));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(LOG2E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(valid, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_inplace_avx2(xs: &mut [f32]) {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), exp8(_mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        for x in &mut xs[i..] {
            *x = exp_f32(*x);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum_avx2(xs: &mut [f32], shift: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let by = _mm256_set1_ps(shift);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let w = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), by));
            _mm256_storeu_ps(p.add(i), w);
            sum = _mm256_add_ps(sum, w);
            i += 8;
        }
        let mut total = hsum8(sum);
        for x in &mut xs[i..] {
            *x = exp_f32(*x - shift);
            total += *x;
        }
        total
    }

    /// The sum of the 8 lanes of `v` (shared by the AVX2 kernels of the crate).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum8(_mm256_add_ps(acc0, acc1));
        while i < n {
            s = (*pa.add(i)).mul_add(*pb.add(i), s);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn widen8(p: *const u16) -> __m256 {
        let v = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16_avx2(row: &[bf16], q: &[f32]) -> f32 {
        let n = row.len();
        let pr = row.as_ptr() as *const u16;
        let pq = q.as_ptr();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(widen8(pr.add(i)), _mm256_loadu_ps(pq.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(widen8(pr.add(i + 8)), _mm256_loadu_ps(pq.add(i + 8)), acc1);
            i += 16;
        }
        let mut s = hsum8(_mm256_add_ps(acc0, acc1));
        while i < n {
            s = row[i].to_f32().mul_add(*pq.add(i), s);
            i += 1;
        }
        s
    }

    /// Lane `i` of the result is the sum of the 8 lanes of `v[i]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn reduce8(v: &[__m256; 8]) -> __m256 {
        let t = [
            _mm256_hadd_ps(v[0], v[1]),
            _mm256_hadd_ps(v[2], v[3]),
            _mm256_hadd_ps(v[4], v[5]),
            _mm256_hadd_ps(v[6], v[7]),
        ];
        // Lanes 0-3 and 4-7 of u[k] are partials of v[4k..4k + 4].
        let u = [_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3])];
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u[0], u[1]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[1]),
        )
    }

    /// # Safety
    /// AVX2 and FMA; every `row(ids[p])` has `d` values with `d % 8 == 0`,
    /// every head has `d` query values; with `NORMS`, `mean` has `d` values
    /// and `norms` a slot per id.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_bf16_avx2<'a, const NORMS: bool>(
        ids: &[u32],
        row: impl Fn(u32) -> &'a [bf16],
        heads: &[u8],
        queries: &[f32],
        mean: &[f32],
        ahead: usize,
        out: &mut [f32],
        norms: &mut [f32],
    ) {
        let n = ids.len();
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut sq = [_mm256_setzero_ps(); 8];
        for p0 in (0..n).step_by(8) {
            let m = (n - p0).min(8);
            for (k, (a, s)) in acc.iter_mut().zip(sq.iter_mut()).enumerate() {
                (*a, *s) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let p = p0 + k;
                if k >= m {
                    continue;
                }
                // Pairs of one row are adjacent (all heads of a key): fetch it once.
                if let Some(&next) = ids.get(p + ahead) {
                    if p + ahead == 0 || ids[p + ahead - 1] != next {
                        prefetch(row(next));
                    }
                }
                let r = row(ids[p]);
                let d = r.len();
                let (pr, q) = (
                    r.as_ptr() as *const u16,
                    queries.as_ptr().add(usize::from(heads[p]) * d),
                );
                for c in (0..d).step_by(8) {
                    let x = widen8(pr.add(c));
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(q.add(c)), *a);
                    if NORMS {
                        let t = _mm256_sub_ps(x, _mm256_loadu_ps(mean.as_ptr().add(c)));
                        *s = _mm256_fmadd_ps(t, t, *s);
                    }
                }
            }
            let dots = reduce8(&acc);
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
            out[p0..p0 + m].copy_from_slice(&lanes[..m]);
            if NORMS {
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_sqrt_ps(reduce8(&sq)));
                norms[p0..p0 + m].copy_from_slice(&lanes[..m]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_f32_avx2(out: &mut [f32], w: f32, row: &[f32]) {
        let n = out.len();
        let (po, pr) = (out.as_mut_ptr(), row.as_ptr());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let o = _mm256_fmadd_ps(wv, _mm256_loadu_ps(pr.add(i)), _mm256_loadu_ps(po.add(i)));
            _mm256_storeu_ps(po.add(i), o);
            i += 8;
        }
        while i < n {
            *po.add(i) = w.mul_add(*pr.add(i), *po.add(i));
            i += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_bf16_avx2(out: &mut [f32], w: f32, row: &[bf16]) {
        let n = out.len();
        let po = out.as_mut_ptr();
        let pr = row.as_ptr() as *const u16;
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let o = _mm256_fmadd_ps(wv, widen8(pr.add(i)), _mm256_loadu_ps(po.add(i)));
            _mm256_storeu_ps(po.add(i), o);
            i += 8;
        }
        while i < n {
            *po.add(i) = w.mul_add(row[i].to_f32(), *po.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::SplitMix64 as Rng;

    fn random_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.signed_f32()).collect()
    }

    const LENS: [usize; 9] = [0, 1, 3, 7, 15, 17, 33, 127, 301];

    #[test]
    fn touch_lines_reads_the_first_byte_of_every_line() {
        let mut rng = Rng(5);
        let buf: Vec<u8> = (0..700).map(|_| rng.next_u64() as u8).collect();
        for (from, to) in [(0, 0), (3, 4), (0, 700), (17, 300), (64, 129), (699, 700)] {
            let bytes = &buf[from..to];
            let base = bytes.as_ptr() as usize;
            let want = bytes
                .iter()
                .enumerate()
                .filter(|&(i, _)| i == 0 || (base + i).is_multiple_of(64))
                .fold(0, |x, (_, &b)| x ^ b);
            assert_eq!(touch_lines(bytes), want, "{from}..{to}");
        }
    }

    #[test]
    fn dots_match_f64_reference_for_every_isa() {
        let mut rng = Rng(1);
        for isa in Isa::all_supported() {
            for &n in &LENS {
                let a = random_vec(&mut rng, n);
                let b = random_vec(&mut rng, n);
                let kb: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
                let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let exact_b: f64 = kb.iter().zip(&b).map(|(x, y)| x.to_f64() * *y as f64).sum();
                let tol = 1e-5 * (n as f64 + 1.0);
                let got = dot_f32_with(isa, &a, &b) as f64;
                assert!((got - exact).abs() <= tol, "{isa:?} n={n} {got} vs {exact}");
                let got = dot_bf16_f32_with(isa, &kb, &b) as f64;
                assert!(
                    (got - exact_b).abs() <= tol,
                    "{isa:?} n={n} {got} vs {exact_b}"
                );
                let s = dot_f32_with(Isa::Scalar, &a, &b) as f64;
                assert!((s - exact).abs() <= tol);
            }
        }
    }

    #[test]
    fn gathered_row_dots_match_scalar_for_every_isa() {
        let mut rng = Rng(11);
        for isa in Isa::all_supported() {
            for &d in &[32usize, 64, 128, 96, 256, 7, 100, 288] {
                for &g in &[1usize, 3, 4, 8] {
                    let n_rows = 37;
                    let store: Vec<bf16> = (0..n_rows * d)
                        .map(|_| bf16::from_f32(rng.signed_f32() * 4.0))
                        .collect();
                    let queries = random_vec(&mut rng, g * d);
                    for &pairs in &[0usize, 1, 15, 16, 17, 33, 70] {
                        let ids: Vec<u32> = (0..pairs)
                            .map(|_| (rng.next_u64() % n_rows as u64) as u32)
                            .collect();
                        let heads: Vec<u8> = (0..pairs)
                            .map(|_| (rng.next_u64() % g as u64) as u8)
                            .collect();
                        let row = |i: u32| &store[i as usize * d..(i as usize + 1) * d];
                        let mut out = vec![f32::NAN; pairs];
                        dot_rows_bf16_with(isa, &ids, row, &heads, &queries, 5, &mut out, None);
                        let mut with_norms = vec![f32::NAN; pairs];
                        let mut norms = vec![f32::NAN; pairs];
                        let mean: Vec<f32> = (0..d).map(|_| rng.signed_f32()).collect();
                        dot_rows_bf16_with(
                            isa,
                            &ids,
                            row,
                            &heads,
                            &queries,
                            5,
                            &mut with_norms,
                            Some((&mean, &mut norms)),
                        );
                        for p in 0..pairs {
                            let h = heads[p] as usize;
                            let want = dot_bf16_scalar(row(ids[p]), &queries[h * d..(h + 1) * d]);
                            let tol = 1e-5 * (d as f32) * (1.0 + want.abs());
                            assert!(
                                (out[p] - want).abs() <= tol && out[p] == with_norms[p],
                                "{isa:?} d={d} g={g} pair {p}/{pairs}: {} vs {want}",
                                out[p]
                            );
                            let norm: f64 = row(ids[p])
                                .iter()
                                .zip(&mean)
                                .map(|(k, &m)| (k.to_f64() - m as f64).powi(2))
                                .sum::<f64>()
                                .sqrt();
                            assert!(
                                (norms[p] as f64 - norm).abs() <= 1e-5 * (1.0 + norm),
                                "{isa:?} d={d} pair {p}: norm {} vs {norm}",
                                norms[p]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "rows of unequal length")]
    fn gathered_row_dots_reject_ragged_rows() {
        let store = [bf16::ONE; 64];
        let row = |i: u32| if i == 0 { &store[..32] } else { &store[..31] };
        let mut out = [0.0; 2];
        dot_rows_bf16(&[0, 1], row, &[0, 0], &[1.0; 32], 1, &mut out, None);
    }

    #[test]
    fn corrected_logits_match_scalar_for_every_isa() {
        let mut rng = Rng(12);
        let table: Vec<f32> = (0..=64)
            .map(|i| -((i as f32) * 0.37).sin() * 5.0 - 3.0)
            .collect();
        let offsets: [f32; 8] = std::array::from_fn(|_| rng.signed_f32());
        let mut norms: [f32; 8] = std::array::from_fn(|_| rng.next_f32() * 2.0);
        norms[5] = 0.0;
        for isa in Isa::all_supported() {
            for &n in &[0usize, 1, 15, 16, 17, 40, 301] {
                let dots: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 8.0).collect();
                let heads: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 8) as u8).collect();
                let key_norms: Vec<f32> = (0..n)
                    .map(|i| {
                        if i % 7 == 0 {
                            0.0
                        } else {
                            rng.next_f32() * 3.0
                        }
                    })
                    .collect();
                let mut got = dots.clone();
                corrected_logits_with(
                    isa, &mut got, &heads, &key_norms, &offsets, &norms, 0.3, &table,
                );
                let mut want = dots.clone();
                corrected_logits_with(
                    Isa::Scalar,
                    &mut want,
                    &heads,
                    &key_norms,
                    &offsets,
                    &norms,
                    0.3,
                    &table,
                );
                for p in 0..n {
                    assert!(
                        (got[p] - want[p]).abs() <= 1e-4 * (1.0 + want[p].abs()),
                        "{isa:?} n={n} pair {p}: {} vs {}",
                        got[p],
                        want[p]
                    );
                }
                // The reference itself, from f64.
                for p in 0..n {
                    let h = heads[p] as usize;
                    let den = norms[h] as f64 * key_norms[p] as f64;
                    let cos = if den > 0.0 {
                        (dots[p] as f64 - offsets[h] as f64) / den
                    } else {
                        0.0
                    };
                    let pos = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * 64.0;
                    let i = (pos as usize).min(63);
                    let f = pos - i as f64;
                    let lnu = table[i] as f64 + f * (table[i + 1] as f64 - table[i] as f64);
                    let exact = dots[p] as f64 * 0.3 - lnu;
                    assert!((want[p] as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()));
                }
            }
        }
    }

    #[test]
    fn axpy_matches_scalar_for_every_isa() {
        let mut rng = Rng(2);
        for isa in Isa::all_supported() {
            for &n in &LENS {
                let row = random_vec(&mut rng, n);
                let rowb: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
                let base = random_vec(&mut rng, n);
                let w = rng.signed_f32() * 3.0;
                let mut o1 = base.clone();
                axpy_f32_with(isa, &mut o1, w, &row);
                let mut o2 = base.clone();
                axpy_bf16_with(isa, &mut o2, w, &rowb);
                for i in 0..n {
                    let e1 = base[i] as f64 + w as f64 * row[i] as f64;
                    let e2 = base[i] as f64 + w as f64 * rowb[i].to_f64();
                    assert!((o1[i] as f64 - e1).abs() <= 1e-6, "{isa:?} n={n} i={i}");
                    assert!((o2[i] as f64 - e2).abs() <= 1e-6, "{isa:?} n={n} i={i}");
                }
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn bf16_multi_kernels_match_scalar_for_every_isa() {
        let mut rng = Rng(4);
        for isa in Isa::all_supported() {
            for &n in &[0usize, 1, 3, 7, 15, 17, 31, 33, 63, 65, 127, 128, 129, 301] {
                let a: Vec<bf16> = random_vec(&mut rng, n)
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect();
                let tol = 1e-5 * (n as f64 + 1.0);
                for g in 0..=9usize {
                    let qs = random_vec(&mut rng, n * g);
                    let rowf: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
                    let mut o1 = vec![7.0f32; g];
                    let mut o2 = vec![7.0f32; g];
                    dot_bf16_f32_multi_with(isa, &a, &qs, &mut o1);
                    dot_f32_multi_with(isa, &rowf, &qs, &mut o2);
                    for h in 0..g {
                        if h >= 8 {
                            assert_eq!((o1[h], o2[h]), (0.0, 0.0));
                            continue;
                        }
                        let want = dot_bf16_f32_with(Isa::Scalar, &a, &qs[h * n..(h + 1) * n]);
                        assert!(
                            (o1[h] - want).abs() <= tol as f32,
                            "{isa:?} n={n} g={g} h={h}"
                        );
                        assert!(
                            (o2[h] - want).abs() <= tol as f32,
                            "{isa:?} n={n} g={g} h={h}"
                        );
                    }
                    let base = random_vec(&mut rng, n * g);
                    let ws = random_vec(&mut rng, g);
                    let mut m1 = base.clone();
                    let mut m2 = base.clone();
                    axpy_bf16_multi_with(isa, &mut m1, &ws, &a);
                    axpy_f32_multi_with(isa, &mut m2, &ws, &rowf);
                    for h in 0..g {
                        for i in 0..n {
                            let j = h * n + i;
                            let e = if h < 8 {
                                base[j] as f64 + ws[h] as f64 * a[i].to_f64()
                            } else {
                                base[j] as f64
                            };
                            assert!((m1[j] as f64 - e).abs() <= 1e-6, "{isa:?} n={n} g={g}");
                            assert!((m2[j] as f64 - e).abs() <= 1e-6, "{isa:?} n={n} g={g}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lane_folds_give_the_sum_and_the_maximum_on_odd_sizes() {
        let mut rng = Rng(9);
        for n in [0usize, 1, 15, 16, 17, 1001] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 10.0).collect();
            if n > 2 {
                xs[1] = f32::NAN;
            }
            let max = |a: f32, x: f32| if x > a { x } else { a };
            let want_max = xs.iter().fold(f32::NEG_INFINITY, |a, &x| max(a, x));
            assert_eq!(fold_lanes(&xs, f32::NEG_INFINITY, max), want_max, "n={n}");
            xs.retain(|x| !x.is_nan());
            let want_sum: f64 = xs.iter().map(|&x| f64::from(x)).sum();
            let sum = fold_lanes(&xs, 0.0, |a, b| a + b);
            assert!(
                (f64::from(sum) - want_sum).abs() <= 1e-3,
                "n={n}: {sum} vs {want_sum}"
            );
        }
    }

    #[test]
    fn shifted_exp_sums_match_the_scalar_reference_on_odd_sizes() {
        let mut rng = Rng(5);
        for isa in Isa::all_supported() {
            for &n in &[0usize, 1, 7, 8, 15, 17, 33, 1001] {
                let mut xs: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 40.0).collect();
                if n > 3 {
                    xs[1] = f32::NEG_INFINITY;
                    xs[2] = f32::NAN;
                }
                let shift = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let want: Vec<f32> = xs.iter().map(|&x| exp_f32(x - shift)).collect();
                let want_sum: f64 = want.iter().map(|&w| f64::from(w)).sum();
                let sum = exp_shifted_sum_with(isa, &mut xs, shift);
                for (i, (y, w)) in xs.iter().zip(&want).enumerate() {
                    assert!((y - w).abs() <= w.abs() * 1e-6, "{isa:?} n={n} i={i}");
                }
                let err = (f64::from(sum) - want_sum).abs();
                assert!(
                    err <= 1e-5 * want_sum.max(1e-30),
                    "{isa:?} n={n}: {sum} vs {want_sum}"
                );
            }
        }
    }

    #[test]
    fn exp_is_within_stated_bound_and_finite_everywhere() {
        let mut rng = Rng(3);
        for isa in Isa::all_supported() {
            for &n in &[1usize, 5, 17, 33, 1001] {
                let mut xs: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 90.0).collect();
                let orig = xs.clone();
                exp_inplace_with(isa, &mut xs);
                for (x, y) in orig.iter().zip(&xs) {
                    let e = (*x as f64).exp();
                    if *x >= EXP_MIN_INPUT && *x <= EXP_MAX_INPUT {
                        let rel = ((*y as f64) - e).abs() / e;
                        assert!(rel <= EXP_MAX_REL_ERROR as f64, "{isa:?} x={x} rel={rel}");
                    } else if *x < EXP_MIN_INPUT {
                        assert_eq!(*y, 0.0);
                    }
                    assert!(y.is_finite());
                }
            }
            let mut special = vec![
                f32::NEG_INFINITY,
                f32::INFINITY,
                -1e30,
                1e30,
                f32::NAN,
                0.0,
                -0.0,
                EXP_MIN_INPUT,
                EXP_MAX_INPUT,
                -87.0,
                -1e4,
                1e4,
                -88.0,
                88.5,
                -100.0,
                -126.0,
                -0.5,
            ];
            let scalar: Vec<f32> = special.iter().map(|&x| exp_f32(x)).collect();
            exp_inplace_with(isa, &mut special);
            for (i, y) in special.iter().enumerate() {
                assert!(y.is_finite(), "{isa:?} i={i} {y}");
                assert!(
                    (y - scalar[i]).abs() <= scalar[i].abs() * 1e-6,
                    "{isa:?} i={i}"
                );
            }
            assert_eq!(special[0], 0.0);
            assert_eq!(special[5], 1.0);
        }
    }
}
