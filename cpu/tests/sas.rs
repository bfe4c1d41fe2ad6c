//! SAS softmax tests: every policy run with `softmax=sas` gives outputs and
//! log-sum-exps within the bound stated in `tandem_kernels::sas` of the same
//! policy with the exact softmax, on random keys with appended rows.

use half::bf16;
use std::sync::Arc;
use tandem_cpu::{Attend, LayerConfig, LayerOutput, LayerStore, PolicySpec, Softmax, WorkerPool};
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::sas::{sas_output_bound, SAS_MAX_REL_ERROR};

const NKV: usize = 2;
const G: usize = 4;
const D: usize = 64;

/// A store of `n` random bf16 rows built for `spec` (its index and sketch),
/// the queries scaled by `q_scale`, and the rows as stored per kv head.
struct Case {
    store: Arc<LayerStore>,
    q: Vec<f32>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

fn build(spec: &PolicySpec, n: usize, q_scale: f32, seed: u64) -> Case {
    let mut rng = SplitMix64(seed);
    let w = NKV * D;
    let bf = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let keys = bf((0..n * w).map(|_| rng.signed_f32() + 0.3).collect());
    let values = bf((0..n * w).map(|_| rng.signed_f32()).collect());
    let q: Vec<f32> = (0..NKV * G * D)
        .map(|_| rng.signed_f32() * q_scale)
        .collect();
    let cfg = LayerConfig {
        n_kv_heads: NKV,
        group: G,
        head_dim: D,
        lsh: spec.lsh,
        kv_dtype: spec.kv_dtype,
        sketch: spec.policy.sketch_rank(D),
        seed,
        ..LayerConfig::default()
    };
    let mut st = LayerStore::new(cfg).expect("config");
    let prefill = n - 37;
    st.load_prefill(&keys[..prefill * w], &values[..prefill * w], 2)
        .expect("prefill");
    st.append(&keys[prefill * w..], &values[prefill * w..])
        .expect("append");
    let (keys, values) = (0..NKV).map(|h| st.stored_rows(h).expect("rows")).unzip();
    Case {
        store: Arc::new(st),
        q,
        keys,
        values,
    }
}

fn run(case: &Case, spec: &PolicySpec) -> LayerOutput {
    let pool = WorkerPool::new(2).expect("pool");
    let mut out = LayerOutput::default();
    let attend = Attend {
        policy: spec.policy,
        softmax: spec.softmax,
        exact_heads: 0,
    };
    pool.run_layer(&case.store, &case.q, attend, &mut out)
        .expect("run");
    out
}

fn parse(s: &str) -> PolicySpec {
    s.parse().expect(s)
}

/// The largest |value| of the store.
fn vmax(case: &Case) -> f32 {
    let all = case.values.iter().flatten();
    all.fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Checks `sas` against `exact` per query head, with `dropped[h]` the
/// softmax mass SAS may drop for head `h`; returns the largest output move.
fn check_within_bound(case: &Case, exact: &LayerOutput, sas: &LayerOutput, dropped: &[f64]) -> f32 {
    let vmax = vmax(case);
    let mut moved = 0.0f32;
    for (h, &m) in dropped.iter().enumerate() {
        let bound = (sas_output_bound(m) as f32) * vmax + 1e-5;
        for j in 0..D {
            let (a, b) = (sas.out[h * D + j], exact.out[h * D + j]);
            assert!(
                (a - b).abs() <= bound,
                "head {h}: {a} vs {b}, bound {bound}"
            );
            moved = moved.max((a - b).abs());
        }
        let e = f64::from(SAS_MAX_REL_ERROR) + m;
        let shift = f64::from(sas.lse[h] - exact.lse[h]);
        assert!(shift <= (1.0 + e).ln() + 1e-5, "head {h}: lse up {shift}");
        assert!(shift >= (1.0 - e).ln() - 1e-5, "head {h}: lse down {shift}");
    }
    moved
}

/// With the cut-off at 16, any selection of at most `n` keys drops at most
/// `(n-1)·e^-16 / (1 + (n-1)·e^-16)` of its mass, so every policy's outputs
/// stay within the bound of that mass.
#[test]
fn every_policy_with_sas_stays_within_the_bound_of_its_exact_softmax() {
    let n = 2000;
    let worst = (n - 1) as f64 * (-16f64).exp();
    let dropped = vec![worst / (1.0 + worst); NKV * G];
    for (i, policy) in [
        "dense",
        "dense:kbits=8,vbits=8",
        "topk:k=50",
        "threshold:eps=0.01",
        "lsh:k=6,l=40,t=2,vskip=0,top=16,per=8",
        "lsh:k=6,l=40,t=2,vskip=0",
    ]
    .into_iter()
    .enumerate()
    {
        let exact = parse(policy);
        let sep = if policy.contains(':') { ',' } else { ':' };
        let sas = parse(&format!("{policy}{sep}softmax=sas,sas_n=16"));
        assert_eq!(sas.softmax, Softmax::Sas { cutoff: 16 });
        let case = build(&exact, n, 2.0, 40 + i as u64);
        let moved = check_within_bound(&case, &run(&case, &exact), &run(&case, &sas), &dropped);
        assert!(moved > 1e-6, "{policy}: softmax=sas changed nothing");
    }
}

/// The oracle samples from SAS's weights: its log-sum-exp (that of the
/// weights drawn from) stays within the bound of the exact one.
#[test]
fn the_oracle_draws_from_the_sas_weights() {
    let n = 500;
    let worst = (n - 1) as f64 * (-16f64).exp();
    let e = f64::from(SAS_MAX_REL_ERROR) + worst / (1.0 + worst);
    let exact = parse("oracle:budget=32");
    let case = build(&exact, n, 2.0, 3);
    let a = run(&case, &exact);
    let b = run(&case, &parse("oracle:budget=32,softmax=sas,sas_n=16"));
    for h in 0..NKV * G {
        let shift = f64::from(b.lse[h] - a.lse[h]);
        assert!(shift.abs() <= -(1.0 - e).ln() + 1e-5, "head {h}: {shift}");
        assert_ne!(a.lse[h], b.lse[h], "head {h}");
    }
}

/// Dense attention with a small cut-off drops real mass: the bound, with
/// the mass of the keys at least N below each head's max measured in f64,
/// still holds.
#[test]
fn dense_with_a_small_cutoff_stays_within_the_bound_of_the_mass_it_drops() {
    let n = 1500;
    let exact = parse("dense");
    let sas = parse("dense:softmax=sas,sas_n=2");
    let case = build(&exact, n, 3.0, 11);
    let scale = 1.0 / (D as f64).sqrt();
    let dropped: Vec<f64> = (0..NKV * G)
        .map(|h| {
            let q = &case.q[h * D..(h + 1) * D];
            let keys = &case.keys[h / G];
            let logits: Vec<f64> = keys
                .chunks_exact(D)
                .map(|k| {
                    k.iter()
                        .zip(q)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            // Keys within f32 rounding of the cut-off count as dropped.
            let cut: f64 = logits
                .iter()
                .filter(|&&l| max - l >= 2.0 - 1e-4)
                .map(|l| (l - max).exp())
                .sum();
            cut / total
        })
        .collect();
    assert!(
        dropped.iter().any(|&m| m > 1e-2),
        "nothing dropped: {dropped:?}"
    );
    let moved = check_within_bound(&case, &run(&case, &exact), &run(&case, &sas), &dropped);
    assert!(moved > 1e-4, "the cut-off changed nothing: {moved}");
}
