//! Threshold policy tests: `threshold:b=B` reports exactly the brute-force
//! set {i : logit_i ≥ B}, `threshold:eps=E` reports every key at or above its
//! final τ and stays within its stated error of dense attention, on every
//! stored format, with keys appended after the prefill (a partial last
//! block), on random keys and on keys with a few large-norm outliers.

#![allow(clippy::needless_range_loop)]

use half::bf16;
use std::sync::Arc;
use tandem_cpu::{
    KvDtype, LayerConfig, LayerOutput, LayerStore, Policy, ThresholdParams, WorkerPool, BOUND_BLOCK,
};
use tandem_kernels::rng::SplitMix64;

const DTYPES: [KvDtype; 4] = [KvDtype::BF16, KvDtype::F32, KvDtype::K8, KvDtype::K8V8];

/// One store and its group queries, with the rows as the store holds them.
struct Case {
    store: Arc<LayerStore>,
    /// Per kv head, `[n][d]` keys and values as stored (int8 dequantized).
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// `[nkv * g][d]`.
    q: Vec<f32>,
    nkv: usize,
    g: usize,
    d: usize,
    n: usize,
}

/// Shape and data of a [`Case`].
#[derive(Clone, Copy)]
struct Shape {
    dtype: KvDtype,
    nkv: usize,
    g: usize,
    d: usize,
    prefill: usize,
    appended: usize,
    /// Keys turned into large-norm outliers along their group's query.
    outliers: usize,
    /// Query scale (the logits' spread).
    q_scale: f32,
    seed: u64,
}

fn build(s: Shape) -> Case {
    let Shape { nkv, g, d, .. } = s;
    let n = s.prefill + s.appended;
    let mut rng = SplitMix64(s.seed);
    let mut keys: Vec<f32> = (0..n * nkv * d).map(|_| rng.signed_f32() + 0.2).collect();
    let values: Vec<f32> = (0..n * nkv * d).map(|_| rng.signed_f32()).collect();
    // Each group's queries share a direction, as heads of a group often do.
    let dirs: Vec<f32> = (0..nkv * d).map(|_| rng.signed_f32()).collect();
    let mut q = vec![0.0f32; nkv * g * d];
    for (i, x) in q.iter_mut().enumerate() {
        let (h, c) = (i / (g * d), i % d);
        *x = (dirs[h * d + c] + 0.3 * rng.signed_f32()) * s.q_scale;
    }
    for _ in 0..s.outliers {
        let t = (rng.next_u64() % n as u64) as usize;
        for h in 0..nkv {
            for c in 0..d {
                keys[(t * nkv + h) * d + c] = dirs[h * d + c] * 12.0;
            }
        }
    }
    let cfg = LayerConfig {
        n_kv_heads: nkv,
        group: g,
        head_dim: d,
        kv_dtype: s.dtype,
        seed: s.seed,
        ..LayerConfig::default()
    };
    let mut st = LayerStore::new(cfg).expect("config");
    let w = nkv * d;
    let p = s.prefill * w;
    let bf = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
    match s.dtype {
        KvDtype::BF16 => st.load_prefill(&bf(&keys[..p]), &bf(&values[..p]), 2),
        _ => st.load_prefill_f32(&keys[..p], &values[..p], 2),
    }
    .expect("prefill");
    // Appended in odd-sized chunks.
    for (k, v) in keys[p..].chunks(3 * w).zip(values[p..].chunks(3 * w)) {
        match s.dtype {
            KvDtype::BF16 => st.append(&bf(k), &bf(v)),
            _ => st.append_f32(k, v),
        }
        .expect("append");
    }
    let (keys, values) = (0..nkv).map(|h| st.stored_rows(h).expect("rows")).unzip();
    Case {
        store: Arc::new(st),
        keys,
        values,
        q,
        nkv,
        g,
        d,
        n,
    }
}

impl Case {
    fn run(&self, policy: Policy) -> LayerOutput {
        let pool = WorkerPool::new(2).expect("pool");
        let mut out = LayerOutput::default();
        pool.run_layer(&self.store, &self.q, policy, &mut out)
            .expect("run");
        out
    }

    /// Query head `qh`'s logits in f64, and per key a bound on how far an f32
    /// evaluation may be from it.
    fn logits(&self, qh: usize) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let (q, keys) = (&self.q[qh * d..(qh + 1) * d], &self.keys[qh / self.g]);
        let scale = 1.0 / (d as f64).sqrt();
        keys.chunks_exact(d)
            .map(|k| {
                let terms = k.iter().zip(q).map(|(a, b)| f64::from(*a) * f64::from(*b));
                let (dot, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                (dot * scale, (1e-5 * abs + 1e-6) * scale)
            })
            .unzip()
    }

    /// f64 softmax attention of query head `qh` over the keys `keep`s.
    fn reference(&self, qh: usize, keep: impl Fn(usize, f64) -> bool) -> (Vec<f64>, f64) {
        let d = self.d;
        let (logits, _) = self.logits(qh);
        let kept: Vec<usize> = (0..self.n).filter(|&i| keep(i, logits[i])).collect();
        if kept.is_empty() {
            return (vec![0.0; d], f64::NEG_INFINITY);
        }
        let m = kept
            .iter()
            .map(|&i| logits[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = kept.iter().map(|&i| (logits[i] - m).exp()).sum();
        let mut o = vec![0.0; d];
        for &i in &kept {
            let w = (logits[i] - m).exp() / z;
            let v = &self.values[qh / self.g][i * d..(i + 1) * d];
            for (o, x) in o.iter_mut().zip(v) {
                *o += w * f64::from(*x);
            }
        }
        (o, m + z.ln())
    }

    fn max_abs_value(&self, qh: usize) -> f64 {
        let v = &self.values[qh / self.g];
        v.iter().fold(0.0f64, |m, x| m.max(f64::from(x.abs())))
    }

    fn blocks(&self) -> u32 {
        self.n.div_ceil(BOUND_BLOCK) as u32
    }
}

/// Asserts that head `qh` of `out` is `want` within `tol` (lse relative to
/// its size).
fn assert_close(
    out: &LayerOutput,
    qh: usize,
    d: usize,
    want: &(Vec<f64>, f64),
    tol: f64,
    what: &str,
) {
    let (o, lse) = want;
    let got = f64::from(out.lse[qh]);
    if lse.is_finite() {
        assert!(
            (got - lse).abs() <= tol * (1.0 + lse.abs()),
            "{what}: lse {got} vs {lse}"
        );
    } else {
        assert_eq!(got, f64::NEG_INFINITY, "{what}");
    }
    for j in 0..d {
        let x = f64::from(out.out[qh * d + j]);
        assert!((x - o[j]).abs() <= tol, "{what}: out[{j}] {x} vs {}", o[j]);
    }
}

fn shapes() -> Vec<Shape> {
    let base = Shape {
        dtype: KvDtype::BF16,
        nkv: 2,
        g: 3,
        d: 17,
        prefill: 301,
        appended: 40,
        outliers: 0,
        q_scale: 4.0,
        seed: 1,
    };
    let mut all = Vec::new();
    for (i, dtype) in DTYPES.into_iter().enumerate() {
        let seed = 10 * i as u64;
        for s in [
            Shape {
                dtype,
                seed,
                ..base
            },
            Shape {
                dtype,
                prefill: 64,
                appended: 1,
                d: 32,
                g: 1,
                seed: seed + 1,
                ..base
            },
            Shape {
                dtype,
                prefill: 0,
                appended: 70,
                seed: seed + 2,
                ..base
            },
            Shape {
                dtype,
                prefill: 1000,
                appended: 29,
                outliers: 3,
                d: 32,
                g: 2,
                seed: seed + 3,
                ..base
            },
        ] {
            all.push(s);
        }
    }
    all
}

#[test]
fn fixed_threshold_reports_exactly_the_keys_at_or_above_it() {
    for s in shapes() {
        let c = build(s);
        for qh in 0..c.nkv * c.g {
            let (logits, err) = c.logits(qh);
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            // Thresholds between two logits (no key within rounding of them),
            // above every key and below every key.
            let mut bs: Vec<f64> = [0, c.n / 7, c.n / 2]
                .iter()
                .filter(|&&k| k + 1 < c.n)
                .map(|&k| 0.5 * (sorted[k] + sorted[k + 1]))
                .collect();
            bs.extend([sorted[0] + 1.0, sorted[c.n - 1] - 1.0]);
            for b in bs {
                let b = b as f32;
                let out = c.run(Policy::Threshold(ThresholdParams::Logit { b }));
                let (b64, what) = (f64::from(b), format!("{:?} qh {qh} b {b}", s.dtype));
                let sure = (0..c.n).filter(|&i| logits[i] >= b64 + err[i]).count();
                let maybe = (0..c.n).filter(|&i| logits[i] >= b64 - err[i]).count();
                let got = out.keys_touched[qh] as usize;
                assert!(
                    sure <= got && got <= maybe,
                    "{what}: {got} not in {sure}..={maybe}"
                );
                if sure == maybe {
                    let want = c.reference(qh, |_, l| l >= b64);
                    assert_close(&out, qh, c.d, &want, 1e-4, &what);
                }
                assert!(out.blocks_scanned[qh] <= c.blocks(), "{what}");
            }
        }
    }
}

#[test]
fn mass_threshold_reports_every_key_above_tau_and_stays_within_its_bound() {
    for s in shapes() {
        let c = build(s);
        for eps in [0.01f32, 0.1, 0.5] {
            let out = c.run(Policy::Threshold(ThresholdParams::Mass { eps }));
            let drop = (c.n as f64 / f64::from(eps)).ln();
            for qh in 0..c.nkv * c.g {
                let what = format!("{:?} n {} qh {qh} eps {eps}", s.dtype, c.n);
                let (logits, err) = c.logits(qh);
                // The block of the largest logit is always scanned, so the
                // final τ is the largest logit less ln(n/ε).
                let top = (0..c.n).max_by(|&a, &b| logits[a].total_cmp(&logits[b]));
                let top = top.expect("keys");
                let (m, m_err) = (logits[top], err[top] + 1e-6 * logits[top].abs());
                let tau = m - drop;
                let sure = (0..c.n)
                    .filter(|&i| logits[i] >= tau + err[i] + m_err)
                    .count();
                let maybe = (0..c.n)
                    .filter(|&i| logits[i] >= tau - err[i] - m_err)
                    .count();
                let got = out.keys_touched[qh] as usize;
                assert!(
                    sure <= got && got <= maybe,
                    "{what}: {got} not in {sure}..={maybe}"
                );
                // Keys near τ weigh at most ε/n of the largest: the same
                // result either way.
                let tol = 1e-4 * (1.0 + m.abs() / 10.0);
                assert_close(&out, qh, c.d, &c.reference(qh, |_, l| l >= tau), tol, &what);
                // Against dense attention over the same store.
                let dense = c.reference(qh, |_, _| true);
                let eps = f64::from(eps);
                let lse = f64::from(out.lse[qh]);
                assert!(
                    (lse - dense.1).abs() <= (1.0 + eps).ln() + tol * (1.0 + dense.1.abs()),
                    "{what}: lse {lse} vs dense {}",
                    dense.1
                );
                let bound = 2.0 * eps * c.max_abs_value(qh) + tol;
                for j in 0..c.d {
                    let x = f64::from(out.out[qh * c.d + j]);
                    assert!(
                        (x - dense.0[j]).abs() <= bound,
                        "{what}: out[{j}] {x} vs {}",
                        dense.0[j]
                    );
                }
                assert!(out.blocks_scanned[qh] >= 1 && out.blocks_scanned[qh] <= c.blocks());
            }
            if s.outliers > 0 && eps <= 0.1 {
                // Outliers along the group's queries raise τ above most
                // blocks' bounds: those are skipped.
                let scanned: u32 = out.blocks_scanned.iter().sum();
                let all = c.blocks() * out.blocks_scanned.len() as u32;
                assert!(scanned < all, "{:?}: {scanned} of {all} blocks", s.dtype);
            }
        }
        let dense = c.run(Policy::Dense);
        assert!(dense.blocks_scanned.iter().all(|&b| b == c.blocks()));
    }
}
