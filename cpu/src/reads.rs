//! The reads of attention over a head's rows, whatever their format: dot
//! products of key rows with the query heads of a group, weighted sums of
//! value rows.

use crate::config::MAX_VALUE_GROUPS;
use crate::packed::{PackedKeys, PackedValues};
use crate::rows::Rows;
use std::borrow::Cow;
use tandem_kernels::int8::{axpy_i8_multi, dot_i8_f32_multi};
use tandem_kernels::packed::{axpy_packed, dot_packed_i8_multi, packed_len};
use tandem_kernels::stream::{dots_bf16, dots_i8, dots_packed, packed_ranges, PackedRun};
use tandem_kernels::vector::{
    axpy_bf16, axpy_bf16_multi, axpy_f32, axpy_f32_multi, dot_bf16_f32_multi, dot_f32,
    dot_f32_multi,
};

/// Rows [`Rows::run_dots`] reads per call, at most.
pub(crate) const RUN: usize = 128;

/// Room for the dot products of one run of rows with up to 8 heads, made
/// once for a pass over many runs (int4 and int2 rows work in `ints` and
/// `ranges` first).
pub(crate) struct RunDots {
    /// `out[h * m + k]`: row `first + k`'s dot product with head `h`.
    pub(crate) out: [f32; 8 * RUN],
    ints: [i32; 8 * RUN],
    los: [f32; RUN],
    steps: [f32; RUN],
}

impl RunDots {
    pub(crate) fn new() -> Self {
        RunDots {
            out: [0.0; 8 * RUN],
            ints: [0; 8 * RUN],
            los: [0.0; RUN],
            steps: [0.0; RUN],
        }
    }
}

/// How much of an int8 step quantizing a query may move one of its values:
/// half a step, with room for the rounding of `q / step` in f32.
const HALF_STEP_WITH_ROUNDING: f32 = 0.51;

/// The query heads of a group in the form a store's keys take them.
pub(crate) struct KeyQueries<'q> {
    /// The queries; for quantized keys, a copy scaled by the keys' channel
    /// scales (`q' = q ⊙ s`).
    pub(crate) scaled: Cow<'q, [f32]>,
    /// For quantized keys, each query's dot product with the keys' offset:
    /// with `k = offset + s ⊙ u`, `q · k = q · offset + q' · u`.
    pub(crate) offsets: [f32; 8],
    /// For int4 and int2 keys, each `q'` as int8 codes (`q' ≈ int_scales[h] ·
    /// code`), `[g][w]` with `w` the packed rows' padded width (0 past `d`).
    pub(crate) ints: Vec<i8>,
    /// Per head, the int8 step of `ints`.
    pub(crate) int_scales: [f32; 8],
    /// Per head, `int_scales[h] · Σ ints[h]`: the query's sum as the integer
    /// dot products see it, which multiplies a row's `lo`.
    pub(crate) int_sums: [f32; 8],
    /// Per head, the most that quantizing `q'` to int8 changes the dot
    /// product with any stored int4 or int2 key (bounds on dot products add
    /// it); 0 for other keys.
    pub(crate) int_slack: [f32; 8],
}

impl<'q> KeyQueries<'q> {
    /// The queries (`[g][d]`, `g <= 8`) for the key rows `keys`.
    pub(crate) fn new(keys: &Rows, queries: &'q [f32], d: usize) -> Self {
        let mut kq = KeyQueries {
            scaled: queries.into(),
            offsets: [0.0; 8],
            ints: Vec::new(),
            int_scales: [0.0; 8],
            int_sums: [0.0; 8],
            int_slack: [0.0; 8],
        };
        let channels = match keys {
            Rows::I8(c) => &c.channels,
            Rows::PackedKeys(p) => &p.channels,
            _ => return kq,
        };
        let scaled = kq.scaled.to_mut();
        for (h, q) in scaled.chunks_exact_mut(d.max(1)).enumerate().take(8) {
            kq.offsets[h] = dot_f32(q, &channels.offset);
            q.iter_mut()
                .zip(&channels.scales)
                .for_each(|(x, s)| *x *= s);
        }
        if let Rows::PackedKeys(p) = keys {
            for q in kq.scaled.to_mut().chunks_exact_mut(d.max(1)).take(8) {
                p.rotation.apply(q);
            }
            kq.quantize(p, d);
        }
        kq
    }

    /// Fills the int8 form of the scaled queries for the keys `p`.
    fn quantize(&mut self, p: &PackedKeys, d: usize) {
        let w = p.bits.planes() * packed_len(d, p.bits);
        let g = (self.scaled.len() / d.max(1)).min(8);
        self.ints = vec![0; g * w];
        for (h, (q, ints)) in self
            .scaled
            .chunks_exact(d.max(1))
            .zip(self.ints.chunks_exact_mut(w))
            .enumerate()
        {
            let max = q.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let step = max / 127.0;
            if !(step > 0.0 && step.is_finite()) {
                continue;
            }
            let mut sum = 0i32;
            for (code, x) in ints.iter_mut().zip(q) {
                *code = (x / step).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(*code);
            }
            self.int_scales[h] = step;
            self.int_sums[h] = step * sum as f32;
            self.int_slack[h] = HALF_STEP_WITH_ROUNDING * step * p.max_l1;
        }
    }
}

impl Rows {
    /// Dot products of key row `i` with the query heads of `kq`, `out.len()`
    /// of them.
    #[inline(always)]
    pub(crate) fn dots(&self, i: usize, kq: &KeyQueries, out: &mut [f32]) {
        match self {
            Rows::Bf16(b) => dot_bf16_f32_multi(b.row(i), &kq.scaled, out),
            Rows::F32(b) => dot_f32_multi(b.row(i), &kq.scaled, out),
            Rows::I8(c) => {
                dot_i8_f32_multi(c.codes.row(i), &kq.scaled, out);
                out.iter_mut().zip(&kq.offsets).for_each(|(x, o)| *x += o);
            }
            Rows::PackedKeys(p) => packed_key_dots(p, i, kq, out),
            // Value rows are never keys.
            Rows::PackedValues(_) => out.fill(0.0),
        }
    }

    /// Dot products of consecutive key rows from `first` with the `g` query
    /// heads of `kq`, head-major: `run.out[h * m + k]` for row `first + k`.
    /// Reads `m` rows, at most [`RUN`] and as many as lie in one block of the
    /// store, and returns `m`.
    pub(crate) fn run_dots(
        &self,
        first: usize,
        g: usize,
        kq: &KeyQueries,
        run: &mut RunDots,
    ) -> usize {
        let queries = &kq.scaled[..];
        let out = &mut run.out;
        match self {
            Rows::Bf16(b) => {
                let rows = b.run(first, RUN);
                dots_bf16(rows, b.d, &queries[..g * b.d], out);
                rows.len() / b.d.max(1)
            }
            Rows::I8(c) => {
                let d = c.codes.d;
                let rows = c.codes.run(first, RUN);
                let m = rows.len() / d.max(1);
                dots_i8(rows, d, &queries[..g * d], out);
                for (h, run) in out.chunks_exact_mut(m.max(1)).take(g).enumerate() {
                    run.iter_mut().for_each(|x| *x += kq.offsets[h]);
                }
                m
            }
            Rows::PackedKeys(p) => packed_run_dots(p, first, g, kq, run),
            Rows::F32(_) | Rows::PackedValues(_) => {
                let mut dots = [0.0f32; 8];
                self.dots(first, kq, &mut dots[..g]);
                for (h, &x) in dots[..g].iter().enumerate() {
                    out[h] = x;
                }
                1
            }
        }
    }

    /// `outs[h] += ws[h] * row i` for every head; int8 rows add their codes,
    /// which [`Rows::finish_sums`] turns into values.
    #[inline(always)]
    pub(crate) fn axpys(&self, i: usize, outs: &mut [f32], ws: &[f32]) {
        match self {
            Rows::Bf16(b) => axpy_bf16_multi(outs, ws, b.row(i)),
            Rows::F32(b) => axpy_f32_multi(outs, ws, b.row(i)),
            Rows::I8(c) => axpy_i8_multi(outs, ws, c.codes.row(i)),
            Rows::PackedValues(p) => {
                for (out, &w) in outs.chunks_exact_mut(p.d.max(1)).zip(ws) {
                    packed_axpy(p, i, out, w);
                }
            }
            // Key rows are never values.
            Rows::PackedKeys(_) => {}
        }
    }

    /// `out += w * row i`, as [`Rows::axpys`] for one head.
    #[inline(always)]
    pub(crate) fn axpy(&self, i: usize, out: &mut [f32], w: f32) {
        match self {
            Rows::Bf16(b) => axpy_bf16(out, w, b.row(i)),
            Rows::F32(b) => axpy_f32(out, w, b.row(i)),
            Rows::I8(c) => axpy_i8_multi(out, &[w], c.codes.row(i)),
            Rows::PackedValues(p) => packed_axpy(p, i, out, w),
            // Key rows are never values.
            Rows::PackedKeys(_) => {}
        }
    }

    /// After [`Rows::axpys`] summed int8 codes with weights whose sum per head
    /// is `weight_sums[h]`, turns each head's `out` into the weighted sum of
    /// the rows themselves, `offset · weight_sum + scales ⊙ out`. Other rows
    /// are summed as they are.
    pub(crate) fn finish_sums(&self, outs: &mut [f32], weight_sums: &[f32]) {
        if let Rows::I8(c) = self {
            let d = c.codes.d.max(1);
            let (scales, offset) = (&c.channels.scales, &c.channels.offset);
            for (out, &w) in outs.chunks_exact_mut(d).zip(weight_sums) {
                for ((o, s), m) in out.iter_mut().zip(scales).zip(offset) {
                    *o = m * w + s * *o;
                }
            }
        }
    }
}

/// [`Rows::dots`] of int4 or int2 keys: `q · k = q · m + lo · Σ q' +
/// step · (q' · code)`, the last on integers.
#[inline(always)]
pub(crate) fn packed_key_dots(p: &PackedKeys, i: usize, kq: &KeyQueries, out: &mut [f32]) {
    let mut ints = [0i32; 8];
    let g = out.len().min(8);
    dot_packed_i8_multi(p.bits, p.codes(i), &kq.ints, &mut ints[..g]);
    let (lo, step) = p.range(i);
    for h in 0..g {
        let int_dot = step * kq.int_scales[h] * ints[h] as f32;
        out[h] = kq.offsets[h] + lo * kq.int_sums[h] + int_dot;
    }
}

/// [`Rows::run_dots`] of int4 or int2 keys, as [`packed_key_dots`] does
/// each.
fn packed_run_dots(
    p: &PackedKeys,
    first: usize,
    g: usize,
    kq: &KeyQueries,
    run: &mut RunDots,
) -> usize {
    let RunDots {
        out,
        ints,
        los,
        steps,
    } = run;
    let stride = p.rows.d;
    let bytes = p.rows.run(first, RUN);
    let m = bytes.len() / stride.max(1);
    let rows = PackedRun {
        bits: p.bits,
        bytes,
        stride,
        len: p.code_len(),
    };
    let w = p.bits.planes() * p.code_len();
    dots_packed(rows, &kq.ints[..g * w], ints);
    packed_ranges(rows, p.code_len(), los, steps);
    for h in 0..g {
        let (offset, sum, int_scale) = (kq.offsets[h], kq.int_sums[h], kq.int_scales[h]);
        let out = out[h * m..(h + 1) * m].iter_mut();
        let rows = ints[h * m..(h + 1) * m]
            .iter()
            .zip(los.iter())
            .zip(steps.iter());
        for (x, ((&int, &lo), &step)) in out.zip(rows) {
            *x = offset + lo * sum + step * int_scale * int as f32;
        }
    }
    m
}

/// `out += w · row i` of int4 or int2 values: `w · step_g` per group times
/// the codes, decoded in registers, then `w · lo_g` per channel.
pub(crate) fn packed_axpy(p: &PackedValues, i: usize, out: &mut [f32], w: f32) {
    let (group, groups) = (p.group(), p.groups().min(MAX_VALUE_GROUPS));
    let mut muls = [0.0f32; MAX_VALUE_GROUPS];
    let mut adds = [0.0f32; MAX_VALUE_GROUPS];
    for g in 0..groups {
        let (lo, step) = p.range(i, g);
        muls[g] = w * step;
        adds[g] = w * lo;
    }
    axpy_packed(p.bits, p.codes(i), group, &muls[..groups], out);
    for (c, o) in out.iter_mut().enumerate().take(groups * group) {
        *o += adds[c / group];
    }
}
