//! Causal attention over the CPU device's window of keys and values.

use std::sync::Mutex;

use half::bf16;
use tandem_kernels::parallel::ThreadPool;
use tandem_kernels::sas::Softmax;
use tandem_kernels::vector::{axpy_bf16_multi, dot_bf16_f32_multi};

use super::{job_failed, matmul::even_bounds, CpuKv};
use crate::error::DeviceError;

/// Which rows the queries of one call see: query `t` sees row `first + t`
/// and the rows before it, all of them or the last `window`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) first: usize,
    pub(super) window: Option<usize>,
}

impl Span {
    /// The rows query `t` attends.
    fn rows(&self, t: usize) -> std::ops::Range<usize> {
        let end = self.first + t + 1;
        let start = self.window.map_or(0, |w| end.saturating_sub(w));
        start..end
    }
}

/// Causal attention of `q.len() / (n_heads·head_dim)` queries over `layer` of
/// `cache`, query `t` seeing `span.rows(t)`, with weights by `softmax`; see
/// [`crate::DenseDevice::attention`].
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    pool: &ThreadPool,
    cache: &CpuKv,
    layer: usize,
    q: &[f32],
    span: Span,
    softmax: Softmax,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), DeviceError> {
    let first_row = span.first;
    let shape = cache.shape();
    let width = shape.n_heads * shape.head_dim;
    let tokens = q.len() / width;
    if !q.len().is_multiple_of(width)
        || out.len() != q.len()
        || lse.len() != tokens * shape.n_heads
        || first_row + tokens > cache.len(layer)
        || span.window == Some(0)
    {
        return Err(DeviceError::Shape(format!(
                "attention of {} query values into {} outputs and {} lse from row {first_row} over {} cached rows",
                q.len(),
                out.len(),
                lse.len(),
                cache.len(layer)
            )));
    }
    let threads = pool.threads();
    if tokens == 1 {
        let seen = span.rows(0);
        if seen.len() <= SMALL_ATTENTION_ROWS {
            // A device window: waking the pool would cost more than the work,
            // and its spinning thread would take a core from the CPU workers.
            let mut p = Partial::new(shape.n_heads, shape.head_dim, softmax);
            attend(cache, layer, q, seen, &mut p);
            p.normalise_into(out, lse);
            return Ok(());
        }
        // One query: split the positions, merge the partials by log-sum-exp.
        let bounds: Vec<usize> = even_bounds(seen.len(), threads, 64)
            .into_iter()
            .map(|b| b + seen.start)
            .collect();
        let partials: Vec<Mutex<Partial>> = (0..threads)
            .map(|_| Mutex::new(Partial::new(shape.n_heads, shape.head_dim, softmax)))
            .collect();
        pool.run(&|i| {
            let mut p = partials[i].lock().unwrap_or_else(|e| e.into_inner());
            attend(cache, layer, q, bounds[i]..bounds[i + 1], &mut p);
        })
        .map_err(job_failed)?;
        let mut merged = Partial::new(shape.n_heads, shape.head_dim, softmax);
        for p in &partials {
            merged.merge(&p.lock().unwrap_or_else(|e| e.into_inner()));
        }
        merged.normalise_into(out, lse);
        return Ok(());
    }
    // Several queries (prefill): split the tokens so that each thread gets about
    // the same number of (query, position) pairs.
    let total: usize = (0..tokens).map(|t| span.rows(t).len()).sum();
    let mut bounds = vec![0usize];
    let mut acc = 0;
    for t in 0..tokens {
        acc += span.rows(t).len();
        if bounds.len() < threads && acc * threads >= total * bounds.len() {
            bounds.push(t + 1);
        }
    }
    while bounds.len() <= threads {
        bounds.push(tokens);
    }
    let mut chunks = Vec::with_capacity(threads);
    let (mut rest, mut rest_lse) = (out, lse);
    for i in 0..threads {
        let n = bounds[i + 1] - bounds[i];
        let (head, tail) = rest.split_at_mut(n * width);
        let (head_lse, tail_lse) = rest_lse.split_at_mut(n * shape.n_heads);
        chunks.push(Mutex::new((head, head_lse)));
        (rest, rest_lse) = (tail, tail_lse);
    }
    pool.run(&|i| {
        let mut guard = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
        let (chunk, chunk_lse) = &mut *guard;
        let mut p = Partial::new(shape.n_heads, shape.head_dim, softmax);
        for (j, t) in (bounds[i]..bounds[i + 1]).enumerate() {
            p.reset();
            attend(
                cache,
                layer,
                &q[t * width..(t + 1) * width],
                span.rows(t),
                &mut p,
            );
            let nh = shape.n_heads;
            p.normalise_into(
                &mut chunk[j * width..(j + 1) * width],
                &mut chunk_lse[j * nh..(j + 1) * nh],
            );
        }
    })
    .map_err(job_failed)
}

/// Rows up to which one query attends on the calling thread alone.
const SMALL_ATTENTION_ROWS: usize = 512;

/// Un-normalised attention over part of the positions, per query head:
/// `out = Σ w·v`, `sum = Σ w`, with `w` the weight of `s - max` by `softmax`
/// (exp, or SAS's approximation of it).
struct Partial {
    head_dim: usize,
    softmax: Softmax,
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
    scores: Vec<f32>,
}

impl Partial {
    fn new(n_heads: usize, head_dim: usize, softmax: Softmax) -> Partial {
        Partial {
            head_dim,
            softmax,
            max: vec![f32::NEG_INFINITY; n_heads],
            sum: vec![0.0; n_heads],
            out: vec![0.0; n_heads * head_dim],
            scores: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.out.fill(0.0);
    }

    fn merge(&mut self, other: &Partial) {
        let d = self.head_dim;
        for h in 0..self.max.len() {
            if other.sum[h] == 0.0 {
                continue;
            }
            let m = self.max[h].max(other.max[h]);
            let a = if self.sum[h] == 0.0 {
                0.0
            } else {
                (self.max[h] - m).exp()
            };
            let b = (other.max[h] - m).exp();
            self.sum[h] = self.sum[h] * a + other.sum[h] * b;
            for (o, x) in self.out[h * d..(h + 1) * d]
                .iter_mut()
                .zip(&other.out[h * d..(h + 1) * d])
            {
                *o = *o * a + x * b;
            }
            self.max[h] = m;
        }
    }

    /// Writes the normalised outputs and each head's log-sum-exp (`-inf` if empty).
    fn normalise_into(&self, out: &mut [f32], lse: &mut [f32]) {
        let d = self.head_dim;
        for h in 0..self.max.len() {
            lse[h] = if self.sum[h] > 0.0 {
                self.max[h] + self.sum[h].ln()
            } else {
                f32::NEG_INFINITY
            };
            let inv = if self.sum[h] > 0.0 {
                1.0 / self.sum[h]
            } else {
                0.0
            };
            for (o, x) in out[h * d..(h + 1) * d]
                .iter_mut()
                .zip(&self.out[h * d..(h + 1) * d])
            {
                *o = x * inv;
            }
        }
    }
}

/// Attention of one token's query heads over `positions`, accumulated into `p`
/// (which must be fresh: this does not merge with earlier contents).
fn attend(
    cache: &CpuKv,
    layer: usize,
    q: &[f32],
    positions: std::ops::Range<usize>,
    p: &mut Partial,
) {
    let shape = cache.shape();
    let d = shape.head_dim;
    let n = positions.len();
    if n == 0 {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let g = shape.group();
    if g > MAX_SHARED_GROUP {
        for h in 0..shape.n_heads {
            attend_group(cache, layer, h / g, h..h + 1, q, &positions, scale, p);
        }
        return;
    }
    for kv in 0..shape.n_kv_heads {
        attend_group(
            cache,
            layer,
            kv,
            kv * g..(kv + 1) * g,
            q,
            &positions,
            scale,
            p,
        );
    }
}

/// Largest GQA group whose query heads share one read of each K/V row.
const MAX_SHARED_GROUP: usize = 8;

/// Attention of query heads `heads` (at most [`MAX_SHARED_GROUP`], all of kv
/// head `kv`) over `positions`: each K and V row is read once for all of them,
/// which is what bounds long-context decode (the rows do not fit in cache).
#[allow(clippy::too_many_arguments)]
fn attend_group(
    cache: &CpuKv,
    layer: usize,
    kv: usize,
    heads: std::ops::Range<usize>,
    q: &[f32],
    positions: &std::ops::Range<usize>,
    scale: f32,
    p: &mut Partial,
) {
    let d = cache.shape().head_dim;
    let (n, g) = (positions.len(), heads.len());
    let keys: &[bf16] = &cache.keys(layer, kv)[positions.start * d..positions.end * d];
    let values: &[bf16] = &cache.values(layer, kv)[positions.start * d..positions.end * d];
    let qs = &q[heads.start * d..heads.end * d];
    p.scores.resize(g * n, 0.0);
    let mut dots = [0.0f32; MAX_SHARED_GROUP];
    let mut max = [f32::NEG_INFINITY; MAX_SHARED_GROUP];
    for (t, k) in keys.chunks_exact(d).enumerate() {
        dot_bf16_f32_multi(k, qs, &mut dots[..g]);
        for j in 0..g {
            let s = dots[j] * scale;
            p.scores[j * n + t] = s;
            max[j] = max[j].max(s);
        }
    }
    let mut sum = [0.0f32; MAX_SHARED_GROUP];
    for j in 0..g {
        sum[j] = p
            .softmax
            .weights_relative(&mut p.scores[j * n..(j + 1) * n], max[j]);
    }
    let mut ws = [0.0f32; MAX_SHARED_GROUP];
    let out = &mut p.out[heads.start * d..heads.end * d];
    for (t, v) in values.chunks_exact(d).enumerate() {
        for (j, w) in ws[..g].iter_mut().enumerate() {
            *w = p.scores[j * n + t];
        }
        axpy_bf16_multi(out, &ws[..g], v);
    }
    for (j, h) in heads.enumerate() {
        p.max[h] = max[j];
        p.sum[h] = sum[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuDevice;
    use crate::device::{DenseDevice, KvLayer};
    use crate::host::{AttentionShape, HostMatrix};

    fn at(kv: &CpuKv, window: Option<usize>) -> KvLayer<'_, CpuKv> {
        KvLayer {
            kv,
            layer: 0,
            window,
            softmax: Softmax::Exact,
        }
    }

    fn pseudo(i: usize) -> f32 {
        ((i as f32 * 0.618_034).fract() - 0.5) * 2.0
    }

    /// Naive f64 causal attention over the bf16-rounded cache.
    fn reference(cache: &CpuKv, layer: usize, q: &[f32], pos: usize) -> Vec<f32> {
        let s = cache.shape();
        let d = s.head_dim;
        let mut out = vec![0f32; s.n_heads * d];
        for h in 0..s.n_heads {
            let kv = h / s.group();
            let keys = cache.keys(layer, kv);
            let values = cache.values(layer, kv);
            let scores: Vec<f64> = (0..=pos)
                .map(|t| {
                    (0..d)
                        .map(|i| keys[t * d + i].to_f64() * q[h * d + i] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..d {
                out[h * d + i] = ((0..=pos)
                    .map(|t| w[t] * values[t * d + i].to_f64())
                    .sum::<f64>()
                    / z) as f32;
            }
        }
        out
    }

    /// ln Σ exp(q·k/√d) over rows `0..=pos` of one kv head, in f64.
    fn reference_lse(cache: &CpuKv, layer: usize, q: &[f32], kv: usize, pos: usize) -> f64 {
        let d = cache.shape().head_dim;
        let keys = cache.keys(layer, kv);
        let s: Vec<f64> = (0..=pos)
            .map(|t| {
                (0..d)
                    .map(|i| keys[t * d + i].to_f64() * q[i] as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn attention_matches_naive_softmax_for_decode_and_prefill() {
        let shape = AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 24,
        };
        let mut cache = CpuKv::new(1, shape);
        let n = 701;
        let kv: Vec<f32> = (0..n * 2 * 24).map(|i| pseudo(i) * 3.0).collect();
        let vv: Vec<f32> = (0..n * 2 * 24).map(|i| pseudo(i + 7777)).collect();
        cache.append(0, &kv, &vv).expect("append");
        let device = CpuDevice::new(2);
        let width = 6 * 24;
        // Prefill-style: the last 37 positions at once.
        let tokens = 37;
        let first = n - tokens;
        let q: Vec<f32> = (0..tokens * width).map(|i| pseudo(i + 99)).collect();
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; tokens * 6];
        device
            .attention(at(&cache, None), &q, 0..tokens, &mut out, &mut lse)
            .expect("attention");
        for t in 0..tokens {
            let want = reference(&cache, 0, &q[t * width..(t + 1) * width], first + t);
            for (a, b) in out[t * width..(t + 1) * width].iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "prefill token {t}: {a} vs {b}");
            }
        }
        // Decode-style: one query at several depths.
        for pos in [0, 1, 63, 64, 200, n - 1] {
            let q1 = q[..width].to_vec();
            let mut out1 = vec![0f32; width];
            let mut lse1 = vec![0f32; 6];
            let mut one_row = cache.clone();
            one_row.truncate(pos + 1);
            device
                .attention(at(&one_row, None), &q1, 0..1, &mut out1, &mut lse1)
                .expect("attention");
            let want = reference(&cache, 0, &q1, pos);
            for (a, b) in out1.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "decode at {pos}: {a} vs {b}");
            }
            for h in 0..6 {
                let want = reference_lse(&cache, 0, &q1[h * 24..(h + 1) * 24], h / 3, pos);
                assert!((lse1[h] as f64 - want).abs() < 1e-4, "lse at {pos}");
            }
        }
    }

    #[test]
    fn a_sliding_window_sees_only_its_last_rows() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let (n, window, tokens) = (900, 37, 5);
        let mut cache = CpuKv::new(1, shape);
        let k: Vec<f32> = (0..n * 32).map(|i| pseudo(i) * 2.0).collect();
        let v: Vec<f32> = (0..n * 32).map(|i| pseudo(i + 31)).collect();
        cache.append(0, &k, &v).expect("append");
        let device = CpuDevice::new(2);
        let q: Vec<f32> = (0..tokens * 64).map(|i| pseudo(i + 5)).collect();
        let (mut out, mut lse) = (vec![0f32; q.len()], vec![0f32; tokens * 4]);
        device
            .attention(at(&cache, Some(window)), &q, 0..tokens, &mut out, &mut lse)
            .expect("attention");
        for t in 0..tokens {
            // The same query over a cache holding only its window.
            let pos = n - tokens + t;
            let mut only = CpuKv::new(1, shape);
            let rows = (pos + 1 - window) * 32..(pos + 1) * 32;
            only.append(0, &k[rows.clone()], &v[rows]).expect("append");
            let want = reference(&only, 0, &q[t * 64..(t + 1) * 64], window - 1);
            for (a, b) in out[t * 64..(t + 1) * 64].iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "token {t}: {a} vs {b}");
            }
        }
        let mut one = vec![0f32; 64];
        let mut one_lse = vec![0f32; 4];
        device
            .attention(
                at(&cache, Some(600)),
                &q[..64].to_vec(),
                0..1,
                &mut one,
                &mut one_lse,
            )
            .expect("one query, a window past the pool's threshold");
        let mut tail = CpuKv::new(1, shape);
        tail.append(0, &k[(n - 600) * 32..], &v[(n - 600) * 32..])
            .expect("append");
        let want = reference(&tail, 0, &q[..64], 599);
        for (a, b) in one.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    /// The window under SAS (cut-off 16) stays within the bound stated in
    /// `tandem_kernels::sas` of exact attention, for one query split over the
    /// pool and for a prefill, and its lse within that bound's shift.
    #[test]
    fn sas_window_attention_stays_within_its_bound_of_exact() {
        use tandem_kernels::sas::{sas_output_bound, SAS_MAX_REL_ERROR};
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let n = 1500;
        let mut cache = CpuKv::new(1, shape);
        let k: Vec<f32> = (0..n * 32).map(|i| pseudo(i) * 4.0).collect();
        let v: Vec<f32> = (0..n * 32).map(|i| pseudo(i + 31)).collect();
        cache.append(0, &k, &v).expect("append");
        let device = CpuDevice::new(2);
        let worst = (n - 1) as f64 * (-16f64).exp() / (1.0 + (n - 1) as f64 * (-16f64).exp());
        let bound = sas_output_bound(worst) as f32 + 1e-5;
        let lse_bound = -(1.0 - f64::from(SAS_MAX_REL_ERROR) - worst).ln() as f32 + 1e-5;
        for tokens in [1usize, 9] {
            let q: Vec<f32> = (0..tokens * 64).map(|i| pseudo(i + 3)).collect();
            let run = |softmax| {
                let (mut out, mut lse) = (vec![0f32; q.len()], vec![0f32; tokens * 4]);
                let keys = KvLayer {
                    softmax,
                    ..at(&cache, None)
                };
                device
                    .attention(keys, &q, 0..tokens, &mut out, &mut lse)
                    .expect("attention");
                (out, lse)
            };
            let (exact, exact_lse) = run(Softmax::Exact);
            let (sas, sas_lse) = run(Softmax::Sas { cutoff: 16 });
            let moved = exact.iter().zip(&sas).map(|(a, b)| (a - b).abs());
            let moved = moved.fold(0.0f32, f32::max);
            assert!(moved <= bound && moved > 1e-6, "tokens {tokens}: {moved}");
            for (a, b) in exact_lse.iter().zip(&sas_lse) {
                assert!((a - b).abs() <= lse_bound, "tokens {tokens}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let shape = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut cache = CpuKv::new(1, shape);
        assert!(cache.append(0, &[0.0; 3], &[0.0; 3]).is_err());
        assert!(cache.append(1, &[0.0; 4], &[0.0; 4]).is_err());
        let device = CpuDevice::new(1);
        let (mut out, mut lse) = (vec![0f32; 8], vec![0f32; 2]);
        assert!(device
            .attention(at(&cache, None), &vec![0.0; 8], 0..1, &mut out, &mut lse)
            .is_err());
        let w = HostMatrix::F32 {
            rows: 2,
            cols: 3,
            data: vec![1.0; 6],
        };
        let mut ys = vec![0f32; 3];
        assert!(device.matmul(&w, &vec![1.0; 3], &mut ys).is_err());
    }

    #[test]
    fn f32_matmul_is_exact_on_small_integers() {
        let device = CpuDevice::new(2);
        let rows = 37;
        let cols = 5;
        let data: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
        let w = HostMatrix::F32 {
            rows,
            cols,
            data: data.clone(),
        };
        let xs: Vec<f32> = (0..2 * cols).map(|i| i as f32).collect();
        let mut ys = vec![0f32; 2 * rows];
        device.matmul(&w, &xs, &mut ys).expect("matmul");
        for t in 0..2 {
            for r in 0..rows {
                let want: f32 = (0..cols)
                    .map(|c| data[r * cols + c] * xs[t * cols + c])
                    .sum();
                assert_eq!(ys[t * rows + r], want);
            }
        }
    }
}
