//! Engine tests: retrieval vs brute force, estimator and merge vs f64
//! formulas, dense vs naive f64 attention, convergence, edge cases.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use half::bf16;
use std::sync::Arc;
use tandem_cpu::{
    ln_u_exact, merge_partials, KvDtype, LayerConfig, LayerOutput, LayerStore, LshIndexParams,
    LshParams, Policy, WorkerPool,
};
use tandem_kernels::hash::{table_code, Projector};
use tandem_kernels::rng::SplitMix64;

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

struct Setup {
    store: Arc<LayerStore>,
    keys: Vec<f32>,   // [n][nkv][d], as the store holds them
    values: Vec<f32>, // same
    /// The keys the store's centring mean comes from (as loaded: int8 stores
    /// fix it before quantizing).
    mean_keys: Vec<f32>,
    q: Vec<f32>,
    n: usize,
}

fn setup(
    n: usize,
    nkv: usize,
    g: usize,
    d: usize,
    lsh: Option<(usize, usize)>,
    t: u8,
    appended: usize,
    seed: u64,
) -> Setup {
    setup_with(KvDtype::BF16, n, nkv, g, d, lsh, t, appended, seed)
}

/// [`setup`] with a row type: f32 stores get unrounded f32 rows through
/// `load_prefill_f32` / `append_f32`.
fn setup_with(
    dtype: KvDtype,
    n: usize,
    nkv: usize,
    g: usize,
    d: usize,
    lsh: Option<(usize, usize)>,
    t: u8,
    appended: usize,
    seed: u64,
) -> Setup {
    let mut rng = SplitMix64(seed);
    let total = n + appended;
    let round = |x: f32| match dtype {
        KvDtype::F32 => x,
        _ => bf16::from_f32(x).to_f32(),
    };
    let keys: Vec<f32> = (0..total * nkv * d)
        .map(|_| round(rng.signed_f32() + 0.3))
        .collect();
    let values: Vec<f32> = (0..total * nkv * d)
        .map(|_| round(rng.signed_f32()))
        .collect();
    let q: Vec<f32> = (0..nkv * g * d).map(|_| rng.signed_f32() * 3.0).collect();
    let shape = (n, nkv, g, d);
    setup_from(dtype, shape, lsh, t, seed, 0, keys, values, q)
}

/// Keys near a 4-dimensional subspace (with appended ones), stored with a
/// key sketch of `sketch` components.
fn setup_low_rank(
    n: usize,
    nkv: usize,
    g: usize,
    d: usize,
    lsh: (usize, usize),
    appended: usize,
    seed: u64,
    sketch: usize,
) -> Setup {
    let mut rng = SplitMix64(seed);
    let total = n + appended;
    let dirs: Vec<f32> = (0..4 * d).map(|_| rng.signed_f32()).collect();
    let mut keys = vec![0.0f32; total * nkv * d];
    for key in keys.chunks_exact_mut(d) {
        for (c, dir) in dirs.chunks_exact(d).enumerate() {
            let a = rng.signed_f32() * (4 - c) as f32;
            key.iter_mut().zip(dir).for_each(|(k, x)| *k += a * x);
        }
        key.iter_mut()
            .for_each(|k| *k = bf16::from_f32(*k + 0.02 * rng.signed_f32()).to_f32());
    }
    let values: Vec<f32> = (0..total * nkv * d)
        .map(|_| bf16::from_f32(rng.signed_f32()).to_f32())
        .collect();
    let q: Vec<f32> = (0..nkv * g * d).map(|_| rng.signed_f32() * 3.0).collect();
    let shape = (n, nkv, g, d);
    setup_from(
        KvDtype::BF16,
        shape,
        Some(lsh),
        2,
        seed,
        sketch,
        keys,
        values,
        q,
    )
}

/// A store of `shape = (prefill n, nkv, g, d)` loaded with the first `n`
/// tokens of `keys`/`values` and appended the rest.
fn setup_from(
    dtype: KvDtype,
    shape: (usize, usize, usize, usize),
    lsh: Option<(usize, usize)>,
    t: u8,
    seed: u64,
    sketch: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
    q: Vec<f32>,
) -> Setup {
    let (n, nkv, g, d) = shape;
    let total = keys.len() / (nkv * d);
    let cfg = LayerConfig {
        n_kv_heads: nkv,
        group: g,
        head_dim: d,
        lsh: lsh.map(|(k, l)| LshIndexParams { k, l, t }),
        seed,
        layer: 3,
        kv_dtype: dtype,
        sketch,
    };
    let mut st = LayerStore::new(cfg).expect("cfg");
    let w = nkv * d;
    match dtype {
        KvDtype::BF16 => st.load_prefill(&bf(&keys[..n * w]), &bf(&values[..n * w]), 2),
        _ => st.load_prefill_f32(&keys[..n * w], &values[..n * w], 2),
    }
    .expect("load");
    for i in n..total {
        let (k, v) = (&keys[i * w..(i + 1) * w], &values[i * w..(i + 1) * w]);
        match dtype {
            KvDtype::BF16 => st.append(&bf(k), &bf(v)),
            _ => st.append_f32(k, v),
        }
        .expect("append");
    }
    // The references read the rows as stored: int8 codes dequantized.
    let (mut held_keys, mut held_values) = (keys.clone(), values.clone());
    for h in 0..nkv {
        let (hk, hv) = st.stored_rows(h).expect("rows");
        for i in 0..total {
            let o = (i * nkv + h) * d;
            held_keys[o..o + d].copy_from_slice(&hk[i * d..(i + 1) * d]);
            held_values[o..o + d].copy_from_slice(&hv[i * d..(i + 1) * d]);
        }
    }
    if matches!(dtype, KvDtype::BF16 | KvDtype::F32) {
        assert_eq!(
            held_keys, keys,
            "bf16 and f32 stores hold their rows exactly"
        );
        assert_eq!(held_values, values);
    }
    Setup {
        store: Arc::new(st),
        keys: held_keys,
        values: held_values,
        mean_keys: keys,
        q,
        n: total,
    }
}

/// Naive f64 softmax attention over a given subset with given logit corrections.
fn reference(
    s: &Setup,
    nkv: usize,
    g: usize,
    d: usize,
    qh: usize,
    subset: &[(usize, f64)],
) -> (Vec<f64>, f64) {
    let kvh = qh / g;
    let q = &s.q[qh * d..(qh + 1) * d];
    let logits: Vec<f64> = subset
        .iter()
        .map(|&(i, corr)| {
            let k = &s.keys[(i * nkv + kvh) * d..(i * nkv + kvh + 1) * d];
            k.iter()
                .zip(q)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                / (d as f64).sqrt()
                - corr
        })
        .collect();
    if logits.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
    let mut o = vec![0.0; d];
    for (&(i, _), l) in subset.iter().zip(&logits) {
        let w = (l - m).exp() / z;
        for j in 0..d {
            o[j] += w * s.values[(i * nkv + kvh) * d + j] as f64;
        }
    }
    (o, m + z.ln())
}

fn run(s: &Setup, policy: Policy) -> LayerOutput {
    let pool = WorkerPool::new(2).expect("pool");
    let mut out = LayerOutput::default();
    pool.run_layer(&s.store, &s.q, policy, &mut out)
        .expect("run");
    out
}

#[test]
fn dense_equals_naive_f64_attention() {
    for &(nkv, g, d, n) in &[
        (2usize, 4usize, 64usize, 301usize),
        (3, 3, 17, 50),
        (1, 1, 5, 1),
    ] {
        let s = setup(n, nkv, g, d, None, 2, 7, 1);
        let out = run(&s, Policy::Dense);
        for qh in 0..nkv * g {
            let all: Vec<(usize, f64)> = (0..s.n).map(|i| (i, 0.0)).collect();
            let (o, lse) = reference(&s, nkv, g, d, qh, &all);
            assert!(
                (out.lse[qh] as f64 - lse).abs() < 1e-4,
                "lse {} vs {}",
                out.lse[qh],
                lse
            );
            for j in 0..d {
                assert!((out.out[qh * d + j] as f64 - o[j]).abs() < 1e-4);
            }
            assert_eq!(out.keys_touched[qh] as usize, s.n);
        }
    }
}

/// Brute force: recreates each kv head's hyperplanes with the store's seeding
/// recipe (splitmix64 normals seeded by `seed`, shared by all heads and layers,
/// with per-dimension sign flips drawn from splitmix64 seeded by
/// `seed ^ layer << 32 ^ head * 0x1000_0001`, layer 3 here), hashes every
/// centred key and the queries through the public projector, and counts table
/// collisions one key at a time.
fn brute_force_retrieved(
    s: &Setup,
    nkv: usize,
    g: usize,
    d: usize,
    k: usize,
    l: usize,
    t: usize,
    seed: u64,
    n_prefill: usize,
) -> Vec<Vec<usize>> {
    let mut result = Vec::new();
    let mut st = SplitMix64(seed);
    let planes: Vec<f32> = (0..k * l * d).map(|_| st.normal() as f32).collect();
    let p = Projector::new(d, k * l, &planes).expect("p");
    for kvh in 0..nkv {
        let mut sr = SplitMix64(seed ^ (3u64 << 32) ^ (kvh as u64).wrapping_mul(0x1000_0001));
        let signs: Vec<f32> = (0..d)
            .map(|_| if sr.next_u64() & 1 == 1 { -1.0 } else { 1.0 })
            .collect();
        let w = p.words_per_vector();
        // mean of prefill keys
        let mut mean = vec![0.0f64; d];
        for i in 0..n_prefill {
            for j in 0..d {
                mean[j] += s.mean_keys[(i * nkv + kvh) * d + j] as f64;
            }
        }
        let mean: Vec<f32> = mean
            .iter()
            .map(|m| {
                if n_prefill == 0 {
                    0.0
                } else {
                    (m / n_prefill as f64) as f32
                }
            })
            .collect();
        let mut kc = vec![0.0f32; s.n * d];
        for i in 0..s.n {
            for j in 0..d {
                kc[i * d + j] = (s.keys[(i * nkv + kvh) * d + j] - mean[j]) * signs[j];
            }
        }
        let mut kbits = vec![0u64; s.n * w];
        p.sign_bits(&kc, &mut kbits);
        for h in 0..g {
            let qh = kvh * g + h;
            let mut qbits = vec![0u64; w];
            let qf: Vec<f32> = (0..d).map(|j| s.q[qh * d + j] * signs[j]).collect();
            p.sign_bits(&qf, &mut qbits);
            let mut ids = Vec::new();
            for i in 0..s.n {
                let c = (0..l)
                    .filter(|&tb| {
                        table_code(&kbits[i * w..(i + 1) * w], tb, k) == table_code(&qbits, tb, k)
                    })
                    .count();
                if c >= t {
                    ids.push(i);
                }
            }
            result.push(ids);
        }
    }
    result
}

#[test]
fn lsh_retrieval_and_estimate_equal_brute_force_and_f64_formula() {
    check_lsh_against_brute_force(
        KvDtype::BF16,
        &[
            (
                2usize, 4usize, 32usize, 500usize, 13usize, 3usize, 20usize, 2u8,
            ),
            (1, 1, 16, 300, 0, 1, 5, 1),
            (3, 3, 24, 257, 5, 4, 30, 3),
            (2, 2, 8, 100, 40, 16, 8, 1),
            (1, 8, 33, 400, 1, 6, 64, 2),
            // Sparse buckets: many gaps >= 4095 take the escape path.
            (1, 2, 8, 10000, 3, 12, 4, 1),
        ],
        0,
    );
}

/// On keys the sketch captures (near a low-rank subspace), the safety sets it
/// finds, among prefilled and appended keys, are the exact top keys: the
/// result is the union estimate over them.
#[test]
fn a_sketch_finds_the_exact_safety_sets_on_low_rank_keys() {
    let (nkv, g, d, n) = (2, 4, 32, 3000);
    let rank = tandem_cpu::sketch_rank_for(d);
    let s = setup_low_rank(n, nkv, g, d, (6, 20), 45, 17, rank);
    assert!(
        s.store.index_bytes()
            > setup_low_rank(n, nkv, g, d, (6, 20), 45, 17, 0)
                .store
                .index_bytes()
    );
    check_lsh_setup(&s, (nkv, g, d, n), (6, 20, 2), 17, 9);
    // A store past the cutoff's sample: the cutoff is placed on a sample.
    let n = 9000;
    let s = setup_low_rank(n, nkv, g, d, (6, 20), 45, 17, rank);
    check_lsh_setup(&s, (nkv, g, d, n), (6, 20, 2), 17, 9);
}

/// The safety set joins the sample with exact weights; a safety set of every
/// key is exact attention.
#[test]
fn lsh_with_a_safety_set_equals_the_f64_union_estimate() {
    let cases: &[LshCase] = &[
        (2, 4, 32, 500, 13, 3, 20, 2),
        (1, 8, 33, 400, 1, 6, 64, 2),
        (3, 3, 24, 257, 5, 4, 30, 3),
    ];
    check_lsh_against_brute_force(KvDtype::BF16, cases, 7);
    check_lsh_against_brute_force(KvDtype::F32, &cases[..1], 31);
    let s = setup(300, 2, 3, 16, Some((8, 4)), 2, 0, 5);
    let all = run(
        &s,
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top: 300,
            per: 0,
        }),
    );
    let dense = run(&s, Policy::Dense);
    for (a, b) in all.out.iter().zip(&dense.out) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    for (a, b) in all.lse.iter().zip(&dense.lse) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// Appends enough tokens to cross several raw -> mid folds and one mid -> bulk
/// merge; retrieval must still equal brute force (with the fixed prefill mean),
/// for bf16 and f32 rows, one and several passes of counters, and t = 1..3.
#[test]
fn lsh_retrieval_equals_brute_force_across_incremental_merges() {
    let app = tandem_cpu::MID_MIN + 2 * tandem_cpu::RAW_MAX + 37;
    check_lsh_against_brute_force(
        KvDtype::BF16,
        &[
            (2, 4, 8, 300, app, 5, 20, 2),
            (1, 6, 12, 40, app, 8, 300, 3),
        ],
        0,
    );
    check_lsh_against_brute_force(KvDtype::F32, &[(1, 3, 16, 500, 700, 6, 24, 1)], 0);
    // The appended keys were folded into packed tables (~1.5 bytes per key and
    // table), not kept as 2-byte codes.
    let s = setup(300, 1, 1, 8, Some((5, 20)), 2, app, 3);
    let raw_code_bytes = s.n * 20 * 2;
    assert!(
        s.store.index_bytes() < raw_code_bytes,
        "{}",
        s.store.index_bytes()
    );
    // A store that was never prefilled: every key arrives by append (zero mean).
    check_lsh_against_brute_force(KvDtype::BF16, &[(1, 2, 8, 0, 1200, 4, 10, 2)], 0);
}

/// Dense over the store equals the naive f64 softmax attention of [`reference`].
fn check_dense_against_reference(s: &Setup, nkv: usize, g: usize, d: usize) {
    let out = run(s, Policy::Dense);
    for qh in 0..nkv * g {
        let all: Vec<(usize, f64)> = (0..s.n).map(|i| (i, 0.0)).collect();
        let (o, lse) = reference(s, nkv, g, d, qh, &all);
        assert!((out.lse[qh] as f64 - lse).abs() < 1e-4, "qh {qh}");
        for j in 0..d {
            assert!((out.out[qh * d + j] as f64 - o[j]).abs() < 1e-4, "qh {qh}");
        }
    }
}

#[test]
fn lsh_and_dense_on_f32_rows_equal_references() {
    check_lsh_against_brute_force(
        KvDtype::F32,
        &[(2, 4, 32, 500, 13, 3, 20, 2), (1, 8, 33, 400, 1, 6, 64, 2)],
        0,
    );
    let (nkv, g, d) = (2, 3, 20);
    let s = setup_with(KvDtype::F32, 301, nkv, g, d, None, 2, 7, 5);
    assert_eq!(s.store.kv_bytes(), 308 * nkv * d * 2 * 4);
    check_dense_against_reference(&s, nkv, g, d);
}

/// int8 keys (and values): retrieval and the estimator equal the references
/// on the rows as stored, dense is exact on them, stored rows are within half
/// a step of the originals, a row costs d bytes (plus the per-channel scales
/// and offset once per head), and results stay near the bf16 store's.
#[test]
fn int8_rows_equal_references_and_stay_near_bf16() {
    for dtype in [KvDtype::K8, KvDtype::K8V8] {
        check_lsh_against_brute_force(
            dtype,
            &[
                (2, 4, 32, 500, 13, 3, 20, 2),
                (1, 8, 33, 400, tandem_cpu::RAW_MAX + 5, 6, 64, 1),
                // Never prefilled: the first appended rows fix the scales.
                (1, 2, 16, 0, 300, 4, 10, 2),
            ],
            0,
        );
        let (nkv, g, d) = (2, 3, 20);
        let s = setup_with(dtype, 301, nkv, g, d, None, 2, 7, 5);
        let (key_bytes, value_bytes) = match dtype {
            KvDtype::K8 => (308 * d + 8 * d, 308 * 2 * d),
            _ => (308 * d + 8 * d, 308 * d + 8 * d),
        };
        assert_eq!(s.store.kv_bytes(), nkv * (key_bytes + value_bytes));
        check_dense_against_reference(&s, nkv, g, d);
        // Top-k of every key is dense; oracle sampling's lse is exact.
        let dense = run(&s, Policy::Dense);
        let all = run(&s, Policy::TopK(s.n));
        let oracle = run(
            &s,
            Policy::Oracle {
                budget: 5000,
                seed: 3,
            },
        );
        for qh in 0..nkv * g {
            assert!(
                (all.lse[qh] - dense.lse[qh]).abs() < 1e-4,
                "{dtype:?} qh {qh}"
            );
            assert!(
                (oracle.lse[qh] - dense.lse[qh]).abs() < 1e-4,
                "{dtype:?} qh {qh}"
            );
            for j in 0..d {
                let (a, b) = (all.out[qh * d + j], dense.out[qh * d + j]);
                assert!((a - b).abs() < 1e-4, "{dtype:?} qh {qh}: {a} vs {b}");
                // 5000 draws: the mean value is within a few hundredths.
                let o = oracle.out[qh * d + j];
                assert!((o - b).abs() < 0.08, "{dtype:?} oracle qh {qh}: {o} vs {b}");
            }
        }
        // Prefilled keys are within half a step of the originals: a step is
        // at most 1.25/127 of the head's largest |k - mean| (the headroom).
        for h in 0..nkv {
            let row = |i: usize| &s.mean_keys[(i * nkv + h) * d..(i * nkv + h + 1) * d];
            let mean: Vec<f32> = (0..d)
                .map(|c| (0..301).map(|i| row(i)[c] as f64).sum::<f64>() as f32 / 301.0)
                .collect();
            let spread = (0..301)
                .flat_map(|i| row(i).iter().zip(&mean).map(|(x, m)| (x - m).abs()))
                .fold(0.0f32, f32::max);
            for i in 0..301 {
                let held = &s.keys[(i * nkv + h) * d..(i * nkv + h + 1) * d];
                for (a, b) in held.iter().zip(row(i)) {
                    assert!((a - b).abs() <= spread * 1.25 / 254.0 + 1e-5, "{a} vs {b}");
                }
            }
        }
        // The same bf16 keys and values in a bf16 store and an int8 store.
        let b = setup_with(KvDtype::BF16, 2000, nkv, g, 64, None, 2, 0, 9);
        let cfg = LayerConfig {
            kv_dtype: dtype,
            ..b.store.config().clone()
        };
        let mut k8 = LayerStore::new(cfg).expect("cfg");
        k8.load_prefill(&bf(&b.keys), &bf(&b.values), 2)
            .expect("load");
        let k8 = Setup {
            store: Arc::new(k8),
            keys: b.keys.clone(),
            values: b.values.clone(),
            mean_keys: b.keys.clone(),
            q: b.q.clone(),
            n: b.n,
        };
        let (want, got) = (run(&b, Policy::Dense), run(&k8, Policy::Dense));
        for qh in 0..nkv * g {
            assert!((want.lse[qh] - got.lse[qh]).abs() < 0.05, "qh {qh}");
            let o = |r: &LayerOutput| r.out[qh * 64..(qh + 1) * 64].to_vec();
            let (w, k) = (o(&want), o(&got));
            let err: f32 = w
                .iter()
                .zip(&k)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm: f32 = w.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!(err <= 0.05 * norm, "{dtype:?} qh {qh}: {err} vs {norm}");
        }
    }
}

type LshCase = (usize, usize, usize, usize, usize, usize, usize, u8);

/// The `top` keys of largest `q·k` for query head `qh`.
fn exact_top(s: &Setup, nkv: usize, g: usize, d: usize, qh: usize, top: usize) -> Vec<usize> {
    let kvh = qh / g;
    let q = &s.q[qh * d..(qh + 1) * d];
    let mut scored: Vec<(f64, usize)> = (0..s.n)
        .map(|i| {
            let k = &s.keys[(i * nkv + kvh) * d..(i * nkv + kvh + 1) * d];
            let dot = k.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum();
            (dot, i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.iter().take(top).map(|&(_, i)| i).collect()
}

/// LSH (with a safety set of `top` keys per head) against the f64 estimator
/// over brute-force retrieval: the safety set's keys uncorrected, the other
/// retrieved keys corrected by `ln u`.
fn check_lsh_against_brute_force(dtype: KvDtype, cases: &[LshCase], top: usize) {
    for &(nkv, g, d, n, app, k, l, t) in cases {
        let seed = 11 + k as u64;
        let s = setup_with(dtype, n, nkv, g, d, Some((k, l)), t, app, seed);
        check_lsh_setup(&s, (nkv, g, d, n), (k, l, t), seed, top);
    }
}

/// [`check_lsh_against_brute_force`] on one store of `shape = (nkv, g, d,
/// prefill n)` and index `(k, l, t)`.
fn check_lsh_setup(
    s: &Setup,
    shape: (usize, usize, usize, usize),
    index: (usize, usize, u8),
    seed: u64,
    top: usize,
) {
    let (nkv, g, d, n) = shape;
    let (k, l, t) = index;
    let out = run(
        s,
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top,
            per: 0,
        }),
    );
    let mut bf = brute_force_retrieved(s, nkv, g, d, k, l, t as usize, seed, n);
    for qh in 0..nkv * g {
        let safe = exact_top(s, nkv, g, d, qh, top);
        bf[qh].retain(|i| !safe.contains(i));
        assert_eq!(
            out.keys_touched[qh] as usize,
            bf[qh].len() + safe.len(),
            "K={k} L={l} t={t} qh={qh}"
        );
        // reference estimator in f64 over the brute-force set
        let kvh = qh / g;
        let q = &s.q[qh * d..(qh + 1) * d];
        let mut mean = vec![0.0f64; d];
        for i in 0..n {
            for j in 0..d {
                mean[j] += s.mean_keys[(i * nkv + kvh) * d + j] as f64 / n as f64;
            }
        }
        let qn = q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let subset: Vec<(usize, f64)> = bf[qh]
            .iter()
            .map(|&i| {
                let kc: Vec<f64> = (0..d)
                    .map(|j| s.keys[(i * nkv + kvh) * d + j] as f64 - mean[j])
                    .collect();
                // bf16 rows give |k - mean| with their dot products (f32).
                let kn = kc.iter().map(|x| x * x).sum::<f64>().sqrt();
                let dot: f64 = kc.iter().zip(q).map(|(a, b)| a * *b as f64).sum();
                let cos = if kn * qn > 0.0 { dot / (kn * qn) } else { 0.0 };
                (i, ln_u_exact(cos, k, l, t as usize))
            })
            .chain(safe.iter().map(|&i| (i, 0.0)))
            .collect();
        let (o, lse) = reference(s, nkv, g, d, qh, &subset);
        if subset.is_empty() {
            assert_eq!(out.lse[qh], f32::NEG_INFINITY);
            assert!(out.out[qh * d..(qh + 1) * d].iter().all(|x| *x == 0.0));
            continue;
        }
        assert!(
            (out.lse[qh] as f64 - lse).abs() < 2e-3,
            "lse {} vs {lse} K={k} L={l}",
            out.lse[qh]
        );
        for j in 0..d {
            assert!(
                (out.out[qh * d + j] as f64 - o[j]).abs() < 2e-3,
                "K={k} L={l} j={j}"
            );
        }
    }
}

#[test]
fn max_keys_caps_by_collision_count() {
    let s = setup(400, 1, 2, 16, Some((2, 16)), 2, 0, 5);
    let full = run(
        &s,
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top: 0,
            per: 0,
        }),
    );
    let capped = run(
        &s,
        Policy::Lsh(LshParams {
            max_keys: Some(10),
            value_skip: 0,
            top: 0,
            per: 0,
        }),
    );
    for h in 0..2 {
        assert!(full.keys_touched[h] > 10);
        assert_eq!(capped.keys_touched[h], 10);
    }
}

#[test]
fn ln_u_matches_closed_form_for_t2() {
    for &(k, l) in &[(10usize, 150usize), (1, 1), (16, 512), (4, 10)] {
        for i in 0..=200 {
            let c = -1.0 + i as f64 / 100.0;
            let p = 1.0 - c.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
            let pk = p.powi(k as i32);
            let u = 1.0 - (1.0 - pk).powi(l as i32) - l as f64 * pk * (1.0 - pk).powi(l as i32 - 1);
            let got = ln_u_exact(c, k, l, 2);
            if l >= 2 && u > 1e-6 {
                assert!(
                    (got - u.ln()).abs() < 1e-6 * (1.0 + u.ln().abs()),
                    "k={k} l={l} c={c} {got} vs {}",
                    u.ln()
                );
            }
            assert!(got.is_finite() && got <= 0.0);
        }
    }
    assert!(ln_u_exact(1.5, 10, 150, 2).is_finite());
    assert!(ln_u_exact(-1.0, 10, 150, 2).is_finite());
}

#[test]
fn merge_equals_softmax_over_union() {
    let mut rng = SplitMix64(3);
    let d = 7;
    let logits: Vec<f64> = (0..40)
        .map(|i| rng.signed_f32() as f64 * 5.0 + if i == 3 { 1e4 } else { 0.0 })
        .collect();
    let vals: Vec<Vec<f64>> = (0..40)
        .map(|_| (0..d).map(|_| rng.signed_f32() as f64).collect())
        .collect();
    let part = |r: std::ops::Range<usize>| -> (Vec<f32>, f32) {
        if r.is_empty() {
            return (vec![0.0; d], f32::NEG_INFINITY);
        }
        let m = logits[r.clone()]
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits[r.clone()].iter().map(|l| (l - m).exp()).sum();
        let mut o = vec![0.0f32; d];
        for i in r {
            for j in 0..d {
                o[j] += ((logits[i] - m).exp() / z * vals[i][j]) as f32;
            }
        }
        (o, (m + z.ln()) as f32)
    };
    let parts = [part(0..10), part(10..10), part(10..25), part(25..40)];
    let refs: Vec<(&[f32], f32)> = parts.iter().map(|(o, l)| (o.as_slice(), *l)).collect();
    let mut out = vec![0.0f32; d];
    let lse = merge_partials(&refs, &mut out);
    let (full, flse) = part(0..40);
    assert!(((lse - flse) / flse).abs() < 1e-6);
    for j in 0..d {
        assert!((out[j] - full[j]).abs() < 1e-5);
        assert!(out[j].is_finite());
    }
    let empty = [(&[0.0f32; 7][..], f32::NEG_INFINITY)];
    assert_eq!(merge_partials(&empty, &mut out), f32::NEG_INFINITY);
    assert!(out.iter().all(|x| *x == 0.0));
}

#[test]
fn edge_cases_empty_single_zero_and_huge_gaps() {
    // empty store
    let cfg = LayerConfig {
        n_kv_heads: 1,
        group: 2,
        head_dim: 4,
        lsh: Some(LshIndexParams { k: 4, l: 8, t: 2 }),
        seed: 1,
        layer: 0,
        kv_dtype: KvDtype::BF16,
        sketch: 0,
    };
    let st = Arc::new(LayerStore::new(cfg.clone()).expect("cfg"));
    let pool = WorkerPool::new(1).expect("pool");
    let mut out = LayerOutput::default();
    let q = vec![1.0f32; 8];
    pool.run_layer(
        &st,
        &q,
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top: 0,
            per: 0,
        }),
        &mut out,
    )
    .expect("run");
    assert!(out.lse.iter().all(|x| *x == f32::NEG_INFINITY));
    assert!(out.out.iter().all(|x| *x == 0.0));
    // single key, and zero query vector (dense)
    let mut one = LayerStore::new(LayerConfig {
        lsh: None,
        ..cfg.clone()
    })
    .expect("cfg");
    one.load_prefill(&bf(&[1.0, 2.0, 3.0, 4.0]), &bf(&[5.0, 6.0, 7.0, 8.0]), 1)
        .expect("load");
    let one = Arc::new(one);
    pool.run_layer(
        &one,
        &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
        Policy::Dense,
        &mut out,
    )
    .expect("run");
    assert_eq!(&out.out[..4], &[5.0, 6.0, 7.0, 8.0]);
    assert_eq!(out.lse[0], 0.0);
    assert!((out.lse[1] - 5.0).abs() < 1e-6);
    // huge logit gap (1e4) with LSH over zero keys and a planted key
    // Sampled with t = 1.
    let mut big = LayerStore::new(LayerConfig {
        lsh: Some(LshIndexParams { k: 4, l: 8, t: 1 }),
        ..cfg.clone()
    })
    .expect("cfg");
    let mut keys = vec![0.0f32; 50 * 4];
    keys[7 * 4..8 * 4].copy_from_slice(&[5000.0, 5000.0, 5000.0, 5000.0]);
    let vals: Vec<f32> = (0..200).map(|i| (i % 7) as f32).collect();
    big.load_prefill(&bf(&keys), &bf(&vals), 1).expect("load");
    let big = Arc::new(big);
    for policy in [
        Policy::Dense,
        Policy::TopK(3),
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top: 0,
            per: 0,
        }),
        Policy::Oracle { budget: 4, seed: 1 },
    ] {
        pool.run_layer(&big, &q, policy, &mut out).expect("run");
        assert!(out.out.iter().all(|x| x.is_finite()), "{policy:?}");
        assert!(out.lse.iter().all(|x| !x.is_nan()), "{policy:?}");
        if matches!(policy, Policy::Dense | Policy::TopK(_)) {
            assert!((out.out[0] - vals[28]).abs() < 1e-3, "{policy:?}");
        }
    }
    // lsh on a store without index -> error, not panic
    assert!(pool
        .run_layer(
            &one,
            &q,
            Policy::Lsh(LshParams {
                max_keys: None,
                value_skip: 0,
                top: 0,
                per: 0,
            }),
            &mut out
        )
        .is_err());
    // bad config
    assert!(LayerStore::new(LayerConfig {
        lsh: Some(LshIndexParams { k: 17, l: 10, t: 2 }),
        ..cfg.clone()
    })
    .is_err());
    assert!(LayerStore::new(LayerConfig {
        group: 9,
        ..cfg.clone()
    })
    .is_err());
    for bad_sketch in [6, 12, 68, cfg.head_dim] {
        let bad = LayerConfig {
            sketch: bad_sketch,
            ..cfg.clone()
        };
        assert!(LayerStore::new(bad).is_err(), "sketch {bad_sketch}");
    }
}

#[test]
fn topk_equals_exact_top_k() {
    let (nkv, g, d) = (2, 2, 16);
    let s = setup(200, nkv, g, d, None, 2, 0, 9);
    let out = run(&s, Policy::TopK(17));
    for qh in 0..nkv * g {
        let kvh = qh / g;
        let q = &s.q[qh * d..(qh + 1) * d];
        let mut sc: Vec<(f64, usize)> = (0..s.n)
            .map(|i| {
                (
                    s.keys[(i * nkv + kvh) * d..(i * nkv + kvh + 1) * d]
                        .iter()
                        .zip(q)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum(),
                    i,
                )
            })
            .collect();
        sc.sort_by(|a, b| b.0.total_cmp(&a.0));
        let subset: Vec<(usize, f64)> = sc[..17].iter().map(|&(_, i)| (i, 0.0)).collect();
        let (o, lse) = reference(&s, nkv, g, d, qh, &subset);
        assert!((out.lse[qh] as f64 - lse).abs() < 1e-3);
        for j in 0..d {
            assert!((out.out[qh * d + j] as f64 - o[j]).abs() < 1e-3);
        }
    }
}

#[test]
fn sampled_estimate_converges_to_dense_as_l_grows_on_peaked_attention() {
    let (nkv, g, d, n) = (1usize, 2usize, 32usize, 4000usize);
    let mut rng = SplitMix64(21);
    let dir: Vec<f32> = (0..d).map(|_| rng.signed_f32()).collect();
    let norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut keys: Vec<f32> = (0..n * d).map(|_| rng.signed_f32()).collect();
    for &t in &[5usize, 900, 1700, 3333] {
        for j in 0..d {
            keys[t * d + j] = dir[j] / norm * 4.0 + 0.2 * rng.signed_f32();
        }
    }
    let vals: Vec<f32> = (0..n * d).map(|_| rng.signed_f32()).collect();
    let q: Vec<f32> = (0..g * d)
        .map(|i| dir[i % d] / norm * 12.0 + 0.3 * rng.signed_f32())
        .collect();
    let mut errs = Vec::new();
    let mut dense_out = None;
    for &l in &[4usize, 32, 256] {
        let cfg = LayerConfig {
            n_kv_heads: nkv,
            group: g,
            head_dim: d,
            lsh: Some(LshIndexParams { k: 8, l, t: 2 }),
            seed: 4,
            layer: 0,
            kv_dtype: KvDtype::BF16,
            sketch: 0,
        };
        let mut st = LayerStore::new(cfg).expect("cfg");
        st.load_prefill(&bf(&keys), &bf(&vals), 2).expect("load");
        let st = Arc::new(st);
        let pool = WorkerPool::new(2).expect("pool");
        let mut out = LayerOutput::default();
        if dense_out.is_none() {
            pool.run_layer(&st, &q, Policy::Dense, &mut out)
                .expect("dense");
            dense_out = Some(out.out.clone());
        }
        pool.run_layer(
            &st,
            &q,
            Policy::Lsh(LshParams {
                max_keys: None,
                value_skip: 0,
                top: 0,
                per: 0,
            }),
            &mut out,
        )
        .expect("lsh");
        let dn = dense_out.as_ref().expect("dense");
        let err: f32 = out
            .out
            .iter()
            .zip(dn)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt()
            / dn.iter().map(|b| b * b).sum::<f32>().sqrt();
        errs.push(err);
    }
    assert!(errs[2] < errs[0], "{errs:?}");
    assert!(errs[2] < 0.1, "{errs:?}");
}

/// Rows evicted through `submit` (appended and hashed on the workers) give the
/// same store, and the same results for every token of a multi-token step, as
/// rows appended directly.
#[test]
fn eviction_on_workers_equals_direct_append_and_multi_token_steps_match() {
    let (nkv, g, d, n, extra) = (2usize, 3usize, 16usize, 200usize, 9usize);
    let lsh = Some((6, 20));
    let direct = setup(n, nkv, g, d, lsh, 2, extra, 11);
    let mut rng = SplitMix64(99);
    let cfg = direct.store.config().clone();
    let w = nkv * d;
    let mut st = LayerStore::new(cfg).expect("cfg");
    st.load_prefill(&bf(&direct.keys[..n * w]), &bf(&direct.values[..n * w]), 1)
        .expect("load");
    let evicting = Arc::new(st);
    let pool = WorkerPool::new(2).expect("pool");
    // Three tokens' queries at once, evicting the extra rows first.
    let tokens = 3;
    let queries: Vec<f32> = (0..tokens * nkv * g * d)
        .map(|_| rng.signed_f32() * 3.0)
        .collect();
    let mut out = LayerOutput::default();
    let evicted = (
        &bf(&direct.keys[n * w..])[..],
        &bf(&direct.values[n * w..])[..],
    );
    let policy = Policy::Lsh(LshParams {
        max_keys: None,
        value_skip: 0,
        top: 0,
        per: 0,
    });
    pool.submit(&evicting, &queries, Some(evicted), policy, &mut out)
        .expect("submit");
    assert!(out.is_pending());
    pool.wait(&mut out).expect("wait");
    assert_eq!(evicting.len(), n + extra);
    assert_eq!(evicting.index_bytes(), direct.store.index_bytes());
    let row = nkv * g * d;
    for t in 0..tokens {
        let mut one = LayerOutput::default();
        pool.run_layer(
            &direct.store,
            &queries[t * row..(t + 1) * row],
            policy,
            &mut one,
        )
        .expect("run");
        assert_eq!(&out.out[t * row..(t + 1) * row], &one.out[..]);
        assert_eq!(&out.lse[t * nkv * g..(t + 1) * nkv * g], &one.lse[..]);
    }
    // A second submit before waiting is refused, not queued behind the first.
    pool.submit(&evicting, &queries, None, Policy::Dense, &mut out)
        .expect("submit");
    assert!(pool
        .submit(&evicting, &queries, None, Policy::Dense, &mut out)
        .is_err());
    pool.wait(&mut out).expect("wait");
    // Bad eviction shapes are errors.
    assert!(pool
        .submit(
            &evicting,
            &queries,
            Some((&evicted.0[..d], &evicted.1[..d])),
            Policy::Dense,
            &mut out
        )
        .is_err());
}

/// LSH sampling with no cap and `value_skip`.
fn lsh(value_skip: u8) -> Policy {
    Policy::Lsh(LshParams {
        max_keys: None,
        value_skip,
        top: 0,
        per: 0,
    })
}

/// Leaving out V rows (`value_skip`) changes no log-sum-exp and moves each
/// output by at most 2^-S of the largest |value|, for several S.
#[test]
fn value_skip_stays_within_its_bound() {
    // Large queries give peaked softmaxes, so there are weights to skip.
    let s = setup(3000, 2, 4, 32, Some((6, 40)), 1, 17, 5);
    let exact = run(&s, lsh(0));
    let vmax = s.values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut moved_any = false;
    for skip in [4u8, 9, 14] {
        let out = run(&s, lsh(skip));
        assert_eq!(out.lse, exact.lse, "skip {skip}");
        assert_eq!(out.keys_touched, exact.keys_touched, "skip {skip}");
        let bound = vmax * (-f32::from(skip)).exp2() + 1e-5;
        for (a, b) in out.out.iter().zip(&exact.out) {
            assert!((a - b).abs() <= bound, "skip {skip}: {a} vs {b}");
            moved_any |= a != b;
        }
    }
    assert!(
        moved_any,
        "no V row was left out: the test data is not peaked"
    );
}

/// Keys with two outlier channels and, per query head, one needle key
/// aligned with its query (half of them among the appended tokens), so that
/// attention is peaked as on real text; values in [-1, 1).
fn needle_rows(
    rng: &mut SplitMix64,
    total: usize,
    nkv: usize,
    g: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let round = |x: f32| bf16::from_f32(x).to_f32();
    let mut keys: Vec<f32> = (0..total * nkv * d)
        .map(|_| rng.signed_f32() + 0.3)
        .collect();
    for k in keys.chunks_exact_mut(d) {
        k[1] = 12.0 * k[1] + 4.0;
        k[d - 3] *= 9.0;
    }
    let values: Vec<f32> = (0..total * nkv * d)
        .map(|_| round(rng.signed_f32()))
        .collect();
    let q: Vec<f32> = (0..nkv * g * d).map(|_| rng.signed_f32() * 3.0).collect();
    for qh in 0..nkv * g {
        let (kvh, pos) = (qh / g, (qh * 977 + 13) % total);
        let qv = &q[qh * d..(qh + 1) * d];
        let norm = qv.iter().map(|x| x * x).sum::<f32>().sqrt();
        let key = &mut keys[(pos * nkv + kvh) * d..(pos * nkv + kvh + 1) * d];
        for (k, x) in key.iter_mut().zip(qv) {
            *k = 6.0 * x / norm;
        }
    }
    keys.iter_mut().for_each(|k| *k = round(*k));
    (keys, values, q)
}

/// int4 and int2 stores (keys and values, and each beside bf16): dense and
/// top-k of every key equal the f64 reference over the rows as stored, but
/// for the int8 query of int4 and int2 keys (its rounding moves a logit here
/// by about 0.05; its worst case, `0.51 · s_q · Σ|u|`, is checked by the
/// rows' unit tests), and every policy stays near the bf16 store under the
/// same policy. Per output value that bound is the values' largest
/// quantization error plus what the keys' logit errors `δ` can move a
/// softmax-weighted mean, `(e^{2δ} - 1) · max|v|`, with `δ` measured on the
/// rows as stored plus 0.1 for the int8 query; sampled policies (oracle, lsh)
/// get 0.05 more for their samples, which follow the perturbed weights.
#[test]
fn int4_and_int2_stores_stay_near_bf16_under_every_policy() {
    use tandem_cpu::{Precision::*, ThresholdParams};
    let (n, appended, nkv, g, d) = (1500, 300, 2, 3, 64);
    let mut rng = SplitMix64(21);
    let (keys, values, q) = needle_rows(&mut rng, n + appended, nkv, g, d);
    let shape = (n, nkv, g, d);
    let make = |dtype| {
        setup_from(
            dtype,
            shape,
            Some((8, 75)),
            2,
            4,
            16,
            keys.clone(),
            values.clone(),
            q.clone(),
        )
    };
    let lsh = |top| {
        Policy::Lsh(LshParams {
            max_keys: None,
            value_skip: 0,
            top,
            per: 0,
        })
    };
    let policies = [
        (Policy::Dense, 0.0),
        (Policy::TopK(64), 0.0),
        (
            Policy::Oracle {
                budget: 3000,
                seed: 5,
            },
            0.05,
        ),
        (lsh(0), 0.05),
        (lsh(16), 0.05),
        (Policy::Threshold(ThresholdParams::Mass { eps: 0.01 }), 0.0),
    ];
    let bf = make(KvDtype::BF16);
    let scale = 1.0 / (d as f64).sqrt();
    for dtype in [
        KvDtype::new(Int4, Int4),
        KvDtype::new(Int2, Int2),
        KvDtype::new(Int4, Int2),
        KvDtype::new(Int4, Bf16),
        KvDtype::new(Bf16, Int2),
    ] {
        let s = make(dtype);
        for policy in [Policy::Dense, Policy::TopK(s.n)] {
            let out = run(&s, policy);
            for qh in 0..nkv * g {
                let all: Vec<(usize, f64)> = (0..s.n).map(|i| (i, 0.0)).collect();
                let (o, lse) = reference(&s, nkv, g, d, qh, &all);
                let err = (out.lse[qh] as f64 - lse).abs();
                assert!(err < 0.1, "{dtype:?} {policy:?} qh {qh}: lse off by {err}");
                for j in 0..d {
                    let err = (out.out[qh * d + j] as f64 - o[j]).abs();
                    assert!(
                        err < 0.02,
                        "{dtype:?} {policy:?} qh {qh} j {j}: off by {err}"
                    );
                }
            }
        }
        let max_v = values
            .iter()
            .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        let value_err = s
            .values
            .iter()
            .zip(&values)
            .fold(0.0f64, |m, (a, b)| m.max(f64::from(a - b).abs()));
        for (policy, sampling) in policies {
            let (want, got) = (run(&bf, policy), run(&s, policy));
            for qh in 0..nkv * g {
                let (kvh, qv) = (qh / g, &q[qh * d..(qh + 1) * d]);
                let logit = |rows: &[f32], i: usize| -> f64 {
                    let k = &rows[(i * nkv + kvh) * d..(i * nkv + kvh + 1) * d];
                    k.iter()
                        .zip(qv)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        * scale
                };
                let key_err = (0..s.n)
                    .map(|i| (logit(&s.keys, i) - logit(&keys, i)).abs())
                    .fold(0.0f64, f64::max);
                let delta = key_err + 0.1;
                let bound = value_err + ((2.0 * delta).exp() - 1.0) * max_v + sampling;
                for j in 0..d {
                    let (a, b) = (got.out[qh * d + j], want.out[qh * d + j]);
                    assert!(
                        f64::from(a - b).abs() <= bound,
                        "{dtype:?} {policy:?} qh {qh} j {j}: {a} vs {b} (bound {bound})"
                    );
                }
                assert!(
                    f64::from(got.lse[qh] - want.lse[qh]).abs() <= delta + sampling,
                    "{dtype:?} {policy:?} qh {qh}"
                );
            }
        }
    }
}
