//! A low-rank 4-bit sketch of one kv head's keys, to find each query head's
//! keys of largest logit without reading every key (LSH's safety set,
//! [`crate::LshParams::top`]): the centred keys' top principal components,
//! fitted on the prefill keys, each divided by its standard deviation, then
//! one scale per key and a 4-bit code per component, blocked for
//! [`tandem_kernels::sketch::sketch_scores`]. The scale per key keeps the
//! long keys, which matter most, as precise as the others.
//!
//! A key's sketch score is its logit's estimate up to a per-query constant
//! (the query's product with the centring mean), so ranking by it needs no
//! correction; keys appended after the fit are projected on the same basis.

use crate::error::CpuError;
use crate::snapshot::{count, ArrayReader, ArrayWriter};
use tandem_kernels::mem::OutOfMemory;
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::sketch::{
    block_bytes, code_place, sketch_scores, sketch_select, Sketched, GROUP, SKETCH_BLOCK, ZERO_CODE,
};
use tandem_kernels::vector::{dot_f32, prefetch};

/// Keys the covariance is estimated from, at most (evenly spaced).
const FIT_SAMPLE: usize = 2048;
/// Subspace iterations of the fit.
const FIT_ITERATIONS: usize = 12;
/// Most components a sketch holds.
pub(crate) const MAX_RANK: usize = 64;
/// The largest code of a component, less [`ZERO_CODE`].
const CODE_MAX: f32 = 7.0;
/// A fitted or loaded sketch has room for one more key per this many it
/// holds before it grows.
const HEADROOM: usize = 4;
/// Sampled blocks fetched ahead of the one [`KeySketch::sample_scores`] copies.
const SAMPLE_PREFETCH: usize = 8;

/// Room for the blocks [`KeySketch::sample_scores`] scores.
#[derive(Default)]
pub(crate) struct SketchSample {
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// One kv head's key sketch.
pub(crate) struct KeySketch {
    d: usize,
    r: usize,
    /// `r` orthonormal rows of `d`: the principal directions.
    basis: Vec<f32>,
    /// Per component, its standard deviation over the fitted keys.
    spread: Vec<f32>,
    /// Blocks of [`SKETCH_BLOCK`] keys' codes in the kernel's layout
    /// ([`tandem_kernels::sketch`]), and each key's scale.
    codes: Vec<u8>,
    scales: Vec<f32>,
    len: usize,
}

impl KeySketch {
    /// Fits an `r`-component sketch (`r` a positive multiple of
    /// [`GROUP`] below `d`, at most [`MAX_RANK`]) to the centred keys
    /// `centred` (rows of `d`) and sketches them; `None` for fewer than `r`
    /// keys or another `r`.
    pub(crate) fn fit(centred: &[f32], d: usize, r: usize) -> Result<Option<Self>, OutOfMemory> {
        let n = centred.len() / d;
        if r == 0 || !r.is_multiple_of(GROUP) || r > MAX_RANK || r >= d || n < r {
            return Ok(None);
        }
        let basis = principal_directions(centred, d, r);
        let mut squares = vec![0.0f64; r];
        for key in centred.chunks_exact(d) {
            for (s, b) in squares.iter_mut().zip(basis.chunks_exact(d)) {
                *s += f64::from(dot_f32(key, b)).powi(2);
            }
        }
        let spread = squares
            .iter()
            .map(|&s| ((s / n as f64).sqrt() as f32).max(f32::MIN_POSITIVE))
            .collect();
        let mut sketch = KeySketch {
            d,
            r,
            basis,
            spread,
            codes: Vec::new(),
            scales: Vec::new(),
            len: 0,
        };
        sketch.reserve(n + n / HEADROOM)?;
        sketch.push(centred)?;
        Ok(Some(sketch))
    }

    /// Makes room for `keys` more keys. A prompt's sketch is made with room
    /// for a share more ([`HEADROOM`]), so that the first appends after it
    /// (the reply, the next turn) do not copy the whole sketch.
    fn reserve(&mut self, keys: usize) -> Result<(), OutOfMemory> {
        let blocks = (self.len + keys).div_ceil(SKETCH_BLOCK);
        let bytes = (blocks * block_bytes(self.r)).saturating_sub(self.codes.len());
        let oom = |bytes| OutOfMemory { bytes };
        self.codes
            .try_reserve_exact(bytes)
            .map_err(|_| oom(bytes))?;
        self.scales
            .try_reserve_exact(keys)
            .map_err(|_| oom(keys * 4))
    }

    /// Sketches the centred keys `centred` (rows of `d`), appended in order.
    pub(crate) fn push(&mut self, centred: &[f32]) -> Result<(), OutOfMemory> {
        let (d, r) = (self.d, self.r);
        let n = centred.len() / d;
        let blocks = (self.len + n).div_ceil(SKETCH_BLOCK);
        let extra = (blocks * block_bytes(r)).saturating_sub(self.codes.len());
        let oom = |bytes| OutOfMemory { bytes };
        self.codes.try_reserve(extra).map_err(|_| oom(extra))?;
        self.scales.try_reserve(n).map_err(|_| oom(n * 4))?;
        self.codes.resize(blocks * block_bytes(r), 0);
        let mut buf = [0.0f32; MAX_RANK];
        let row = &mut buf[..r];
        for key in centred.chunks_exact(d) {
            let (block, lane) = (self.len / SKETCH_BLOCK, self.len % SKETCH_BLOCK);
            let base = block * block_bytes(r);
            for ((y, b), s) in row
                .iter_mut()
                .zip(self.basis.chunks_exact(d))
                .zip(&self.spread)
            {
                *y = dot_f32(key, b) / s;
            }
            let top = row.iter().fold(0.0f32, |m, y| m.max(y.abs()));
            let scale = if top > 0.0 { top / CODE_MAX } else { 0.0 };
            for (c, &y) in row.iter().enumerate() {
                let code = if scale > 0.0 {
                    (y / scale).round()
                } else {
                    0.0
                };
                let code = (code.clamp(-CODE_MAX, CODE_MAX) + f32::from(ZERO_CODE)) as u8;
                let (byte, shift) = code_place(lane, c);
                self.codes[base + byte] |= code << shift;
            }
            self.scales.push(scale);
            self.len += 1;
        }
        Ok(())
    }

    /// Writes the sketch: its rank and keys, basis, spreads, codes and scales.
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        out.put(&[self.r as u64, self.len as u64]);
        out.put(&self.basis);
        out.put(&self.spread);
        out.put(&self.codes);
        out.put(&self.scales);
    }

    /// The sketch [`KeySketch::save`] wrote, which must be of rank `r` over
    /// keys of `d` and hold at most `max_keys` keys.
    pub(crate) fn load(
        d: usize,
        r: usize,
        max_keys: usize,
        input: &mut ArrayReader,
    ) -> Result<KeySketch, CpuError> {
        let header = input.get::<u64>("sketch size", 2)?;
        if header[0] != r as u64 {
            return Err(CpuError::Snapshot(format!(
                "a key sketch of {} components, configured {r}",
                header[0]
            )));
        }
        let len = count("sketched keys", header[1], max_keys)?;
        let blocks = len.div_ceil(SKETCH_BLOCK);
        let mut sketch = KeySketch {
            d,
            r,
            basis: input.get("sketch basis", r * d)?,
            spread: input.get("sketch spreads", r)?,
            codes: input.get("sketch codes", blocks * block_bytes(r))?,
            scales: input.get("sketch scales", len)?,
            len,
        };
        sketch.reserve(len / HEADROOM)?;
        Ok(sketch)
    }

    /// Keys sketched.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.codes.len() + (self.scales.len() + self.basis.len() + self.spread.len()) * 4
    }

    /// The `queries` (rows of `d`, at most 8) in the sketch's terms
    /// (`[g][r]`: spreads folded in, each query scaled to int8), for
    /// [`KeySketch::sample_scores`] and [`KeySketch::select`]. A query's
    /// scores are its logits' estimates up to a positive factor and a
    /// constant of its own.
    pub(crate) fn project(&self, queries: &[f32], projected: &mut Vec<i8>) {
        let (d, r) = (self.d, self.r);
        projected.clear();
        let mut buf = [0.0f32; MAX_RANK];
        let row = &mut buf[..r];
        for q in queries.chunks_exact(d) {
            for ((x, b), s) in row
                .iter_mut()
                .zip(self.basis.chunks_exact(d))
                .zip(&self.spread)
            {
                *x = dot_f32(q, b) * s;
            }
            let top = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = if top > 0.0 { 127.0 / top } else { 0.0 };
            projected.extend(row.iter().map(|x| (x * scale).round() as i8));
        }
    }

    /// The scores of the keys of every `every`-th block of
    /// [`SKETCH_BLOCK`] keys for each projected query, head-major
    /// (`[g][m]`) into `out`, the blocks gathered in `sample`; returns `m`,
    /// the keys sampled.
    pub(crate) fn sample_scores(
        &self,
        projected: &[i8],
        every: usize,
        sample: &mut SketchSample,
        out: &mut Vec<f32>,
    ) -> usize {
        let r = self.r;
        let g = projected.len() / r;
        let stride = block_bytes(r);
        let (codes, scales) = (&mut sample.codes, &mut sample.scales);
        codes.clear();
        scales.clear();
        let (blocks, every) = (self.len.div_ceil(SKETCH_BLOCK), every.max(1));
        let keys = |b: usize| b * SKETCH_BLOCK..((b + 1) * SKETCH_BLOCK).min(self.len);
        for b in (0..blocks).step_by(every) {
            // The sampled blocks lie far apart: each is a cold read that
            // the copy would otherwise wait on in turn.
            let ahead = b + SAMPLE_PREFETCH * every;
            if ahead < blocks {
                prefetch(&self.codes[ahead * stride..(ahead + 1) * stride]);
                prefetch(&self.scales[keys(ahead)]);
            }
            codes.extend_from_slice(&self.codes[b * stride..(b + 1) * stride]);
            scales.extend_from_slice(&self.scales[keys(b)]);
        }
        let m = scales.len();
        out.clear();
        out.resize(g * m, 0.0);
        let keys = Sketched {
            codes,
            scales,
            r,
            n: m,
        };
        sketch_scores(keys, projected, out);
        m
    }

    /// Sets bit `h` of `mask[i]` for every key `i` whose score for projected
    /// query `h` reaches `cutoffs[h]`.
    pub(crate) fn select(&self, projected: &[i8], cutoffs: &[f32], mask: &mut [u8]) {
        let keys = Sketched {
            codes: &self.codes,
            scales: &self.scales,
            r: self.r,
            n: self.len,
        };
        sketch_select(keys, projected, cutoffs, mask);
    }
}

/// The top `r` principal directions of the rows of `centred` (rows of `d`),
/// as `r` orthonormal rows: subspace iteration on their covariance, from a
/// sample of at most [`FIT_SAMPLE`] rows.
fn principal_directions(centred: &[f32], d: usize, r: usize) -> Vec<f32> {
    let n = centred.len() / d;
    let stride = n.div_ceil(FIT_SAMPLE).max(1);
    let mut cov = vec![0.0f64; d * d];
    for key in centred.chunks_exact(d).step_by(stride) {
        for (i, &a) in key.iter().enumerate() {
            let row = &mut cov[i * d..(i + 1) * d];
            for (c, &b) in row.iter_mut().zip(key) {
                *c += f64::from(a) * f64::from(b);
            }
        }
    }
    let mut rng = SplitMix64(0x5ce7c4);
    let mut basis: Vec<f64> = (0..r * d).map(|_| rng.normal()).collect();
    orthonormalize(&mut basis, d);
    let mut next = vec![0.0f64; r * d];
    for _ in 0..FIT_ITERATIONS {
        for (out, v) in next.chunks_exact_mut(d).zip(basis.chunks_exact(d)) {
            for (o, row) in out.iter_mut().zip(cov.chunks_exact(d)) {
                *o = row.iter().zip(v).map(|(a, b)| a * b).sum();
            }
        }
        std::mem::swap(&mut basis, &mut next);
        orthonormalize(&mut basis, d);
    }
    basis.iter().map(|&x| x as f32).collect()
}

/// Modified Gram-Schmidt over the rows of `v` (rows of `d`); a row that
/// vanishes is replaced by a unit vector not yet spanned.
fn orthonormalize(v: &mut [f64], d: usize) {
    let r = v.len() / d;
    for i in 0..r {
        for j in 0..i {
            let (done, rest) = v.split_at_mut(i * d);
            let (prev, row) = (&done[j * d..(j + 1) * d], &mut rest[..d]);
            let p: f64 = prev.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(prev).for_each(|(x, a)| *x -= p * a);
        }
        let row = &mut v[i * d..(i + 1) * d];
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 {
            row.iter_mut().for_each(|x| *x /= norm);
        } else {
            row.iter_mut().for_each(|x| *x = 0.0);
            row[i % d] = 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys near a 4-dimensional subspace of 24 dimensions.
    fn low_rank_keys(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        let dirs: Vec<f32> = (0..4 * d).map(|_| rng.normal() as f32).collect();
        let mut keys = vec![0.0f32; n * d];
        for key in keys.chunks_exact_mut(d) {
            for (c, dir) in dirs.chunks_exact(d).enumerate() {
                let a = rng.normal() as f32 * (4 - c) as f32;
                key.iter_mut().zip(dir).for_each(|(k, x)| *k += a * x);
            }
            key.iter_mut()
                .for_each(|k| *k += 0.05 * rng.normal() as f32);
        }
        keys
    }

    #[test]
    fn the_basis_is_orthonormal_and_scores_follow_the_logits() {
        let (n, d, r) = (500, 24, 8);
        let keys = low_rank_keys(n, d, 5);
        let mut sketch = KeySketch::fit(&keys[..300 * d], d, r)
            .expect("memory")
            .expect("fits");
        sketch.push(&keys[300 * d..]).expect("memory");
        assert_eq!(sketch.len(), n);
        for (i, a) in sketch.basis.chunks_exact(d).enumerate() {
            for (j, b) in sketch.basis.chunks_exact(d).enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot_f32(a, b) - want).abs() < 1e-4, "{i} {j}");
            }
        }
        // The keys live in the sketched subspace: scores are q·k up to a
        // positive factor and a constant, within a few code steps.
        let mut rng = SplitMix64(9);
        let q: Vec<f32> = (0..2 * d).map(|_| rng.normal() as f32).collect();
        let mut projected = Vec::new();
        sketch.project(&q, &mut projected);
        let (mut sample, mut scores) = (SketchSample::default(), Vec::new());
        assert_eq!(
            sketch.sample_scores(&projected, 1, &mut sample, &mut scores),
            n
        );
        for h in 0..2 {
            let qh = &q[h * d..(h + 1) * d];
            let exact: Vec<f64> = keys
                .chunks_exact(d)
                .map(|k| f64::from(dot_f32(k, qh)))
                .collect();
            let got: Vec<f64> = scores[h * n..(h + 1) * n]
                .iter()
                .map(|&s| f64::from(s))
                .collect();
            let (fit, worst) = affine_fit(&got, &exact);
            assert!(fit > 0.0, "head {h}: scores fall as logits rise");
            let spread = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(worst < 0.1 * spread, "head {h}: {worst} vs {spread}");
        }
        // Sampling every other block scores its keys alike.
        let mut sampled = Vec::new();
        let m = sketch.sample_scores(&projected, 2, &mut sample, &mut sampled);
        assert_eq!(
            m,
            (0..n.div_ceil(16))
                .step_by(2)
                .map(|b| (n - 16 * b).min(16))
                .sum::<usize>()
        );
        assert_eq!(sampled[..16], scores[..16]);
        assert_eq!(sampled[16..32], scores[32..48]);
    }

    /// The slope `a` of the least-squares fit `y ≈ a x + b`, and the largest
    /// residual.
    fn affine_fit(x: &[f64], y: &[f64]) -> (f64, f64) {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
        let a = sxy / sxx;
        let worst = x
            .iter()
            .zip(y)
            .map(|(a_, b)| (a * (a_ - mx) + my - b).abs())
            .fold(0.0, f64::max);
        (a, worst)
    }

    #[test]
    fn fitted_and_loaded_sketches_take_a_share_more_keys_without_moving() {
        let (n, d, r) = (400, 24, 8);
        let more = n / HEADROOM;
        let keys = low_rank_keys(n + more, d, 3);
        let room = |s: &KeySketch, keys: usize| {
            s.codes.capacity() >= keys.div_ceil(SKETCH_BLOCK) * block_bytes(r)
                && s.scales.capacity() >= keys
        };
        let mut sketch = KeySketch::fit(&keys[..n * d], d, r)
            .expect("memory")
            .expect("fits");
        assert!(room(&sketch, n + more));
        let before = (sketch.codes.as_ptr(), sketch.scales.as_ptr());
        for key in keys[n * d..].chunks_exact(d) {
            sketch.push(key).expect("memory");
        }
        assert_eq!(sketch.len(), n + more);
        assert_eq!((sketch.codes.as_ptr(), sketch.scales.as_ptr()), before);

        let mut out = ArrayWriter::new();
        sketch.save(&mut out);
        let arrays = out.into_arrays();
        let slices: Vec<&[u8]> = arrays.iter().map(Vec::as_slice).collect();
        let mut input = ArrayReader::new(&slices);
        let loaded = KeySketch::load(d, r, n + more, &mut input).expect("load");
        assert_eq!(loaded.len(), n + more);
        assert!(room(&loaded, n + more + (n + more) / HEADROOM));
    }

    #[test]
    fn too_few_keys_or_too_many_components_fit_nothing() {
        let keys = low_rank_keys(3, 24, 1);
        assert!(KeySketch::fit(&keys, 24, 8).expect("memory").is_none());
        assert!(KeySketch::fit(&keys, 24, 24).expect("memory").is_none());
        assert!(KeySketch::fit(&keys, 24, 0).expect("memory").is_none());
        let more = low_rank_keys(50, 24, 1);
        assert!(
            KeySketch::fit(&more, 24, 12).expect("memory").is_none(),
            "not a multiple of 8"
        );
    }
}
