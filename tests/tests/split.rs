//! The split decode step on the default model: dense device + CPU workers.

use std::sync::Arc;

use tandem_gpu::CpuDevice;
use tandem_runtime::model::Logits;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::split::SequenceKv;
use tandem_runtime::{Engine, EngineOptions, Flow, SamplingConfig};
use tandem_tests::model_path;

fn fill_tokens(engine: &Engine, n: usize) -> Vec<u32> {
    let text = include_str!("../data/fill.txt");
    let ids = engine.tokenizer().encode(text, false).expect("encode");
    ids.into_iter().cycle().take(n).collect()
}

/// A small window so that a few hundred tokens already exercise offloading.
fn small_window(policy: &str) -> PolicyConfig {
    PolicyConfig {
        policy: policy.into(),
        dense_layers: Some(vec![0]),
        sinks: 4,
        window: 16,
        dense_below: 64,
        ..PolicyConfig::default()
    }
}

fn engine(policy: PolicyConfig) -> Engine {
    Engine::load(
        &model_path(),
        &EngineOptions {
            threads: 2,
            cpu_workers: 2,
            policy,
            ..EngineOptions::default()
        },
    )
    .expect("load")
}

/// Teacher-forced logits of `steps` decode steps after `prompt`, for a sequence
/// under `table` of `engine`.
fn decode_logits(
    engine: &Engine,
    kv: &mut SequenceKv<CpuDevice>,
    prompt: &[u32],
    steps: &[u32],
) -> Vec<Vec<f32>> {
    let model = engine.model();
    model.forward(prompt, kv, Logits::Last).expect("prefill");
    let mut out = Vec::new();
    for &t in steps {
        kv.offload_if_due(2).expect("offload");
        out.push(model.forward(&[t], kv, Logits::Last).expect("step"));
    }
    out
}

fn sequence(engine: &Engine) -> SequenceKv<CpuDevice> {
    let c = engine.model().config();
    SequenceKv::new(
        Arc::clone(engine.model().device()),
        c.n_layers,
        c.attention_shape(),
        Arc::new(engine.policy_table().clone()),
        engine.workers().cloned(),
    )
    .expect("sequence")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exact_offloaded_attention_equals_dense_decode_and_keeps_every_token_once() {
    let exact = engine(small_window("exact"));
    let tokens = fill_tokens(&exact, 240);
    let (prompt, steps) = tokens.split_at(150);
    let mut split = sequence(&exact);
    let got = decode_logits(&exact, &mut split, prompt, steps);
    assert!(split.is_offloaded());
    let mut dense = exact.model().new_cache().expect("cache");
    let want = decode_logits(&exact, &mut dense, prompt, steps);
    // Float tolerance: the dense decode itself moves by up to ~0.12 in a logit
    // when its attention is split over 1 or 2 threads instead (partials merge in
    // another order, and 16-bit activations round differently after that).
    let mut total = 0.0;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff = max_abs_diff(g, w);
        total += diff;
        assert!(diff < 0.3, "step {i}: logits differ by {diff}");
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 0.3 {
            assert_eq!(
                tandem_kernels::ops::argmax(g),
                tandem_kernels::ops::argmax(w),
                "step {i}"
            );
        }
    }
    let mean = total / got.len() as f32;
    assert!(mean < 0.08, "mean max |Δlogit| {mean}");
    // Every token is held exactly once: on the device or in the CPU store.
    let positions = split.positions();
    assert_eq!(positions, 240);
    for layer in 0..exact.model().config().n_layers {
        let (device, cpu) = split.layer_tokens(layer);
        assert_eq!(device + cpu, positions, "layer {layer}");
        if layer != 0 {
            assert_eq!(device, 4 + 16 + 1, "layer {layer} device rows");
        }
    }
}

#[test]
fn lsh_approaches_dense_as_tables_grow() {
    let mut errors = Vec::new();
    let mut dense_logits = None;
    for l in [4usize, 64, 400] {
        // Sampling alone: the fidelity check would attend coarse tables exactly.
        let engine = engine(PolicyConfig {
            fidelity_check: 0.0,
            ..small_window(&format!("lsh:k=6,l={l},t=2"))
        });
        let tokens = fill_tokens(&engine, 400);
        let (prompt, steps) = tokens.split_at(380);
        let want = dense_logits.get_or_insert_with(|| {
            let mut dense = engine.model().new_cache().expect("cache");
            decode_logits(&engine, &mut dense, prompt, steps)
        });
        let mut kv = sequence(&engine);
        let got = decode_logits(&engine, &mut kv, prompt, steps);
        let err: f32 = got
            .iter()
            .zip(want.iter())
            .map(|(g, w)| max_abs_diff(g, w))
            .sum::<f32>()
            / got.len() as f32;
        errors.push(err);
    }
    assert!(
        errors[2] < errors[0] && errors[2] < 0.5 * errors[0],
        "mean max |Δlogit| by L = 4, 64, 400: {errors:?}"
    );
}

#[test]
fn batched_sessions_generate_what_each_generates_alone() {
    let engine = engine(small_window("lsh:k=6,l=60,t=2"));
    let fill = fill_tokens(&engine, 300);
    let prompts: Vec<&[u32]> = vec![&fill[..120], &fill[50..200], &fill[100..300]];
    let greedy = SamplingConfig::default();
    let mut alone = Vec::new();
    for p in &prompts {
        let mut s = engine.session().expect("session");
        let mut text = String::new();
        s.generate(p, 24, &greedy, None, &mut |_, _| {}, &mut |t| {
            text.push_str(t);
            Flow::Continue
        })
        .expect("generate");
        alone.push(text);
    }
    let mut sessions: Vec<_> = (0..3).map(|_| engine.session().expect("session")).collect();
    let mut refs: Vec<_> = sessions.iter_mut().collect();
    let mut together = vec![String::new(); 3];
    let stats = engine
        .generate_batch(&mut refs, &prompts, 24, &greedy, None, &mut |i, t| {
            together[i].push_str(t);
            Flow::Continue
        })
        .expect("batch");
    assert_eq!(together, alone);
    assert!(stats.iter().all(|s| s.generated_tokens > 0));
    assert!(sessions.iter().all(|s| s.kv().is_offloaded()));
}

#[test]
fn a_failing_worker_is_an_error_of_generate_and_reset_recovers() {
    let engine = engine(small_window("lsh:k=6,l=30,t=2"));
    let prompt = fill_tokens(&engine, 100);
    let greedy = SamplingConfig::default();
    let mut session = engine.session().expect("session");
    session
        .generate(&prompt, 2, &greedy, None, &mut |_, _| {}, &mut |_| {
            Flow::Continue
        })
        .expect("generate");
    engine
        .workers()
        .expect("sparse policy has workers")
        .inject_panic();
    let err = session
        .generate(&prompt[..8], 4, &greedy, None, &mut |_, _| {}, &mut |_| {
            Flow::Continue
        })
        .expect_err("the worker failure must surface");
    assert!(err.to_string().contains("panicked"), "{err}");
    // The half-run step left the session unusable until reset.
    assert!(session
        .generate(&prompt[..8], 1, &greedy, None, &mut |_, _| {}, &mut |_| {
            Flow::Continue
        })
        .is_err());
    session.reset();
    session
        .generate(&prompt, 2, &greedy, None, &mut |_, _| {}, &mut |_| {
            Flow::Continue
        })
        .expect("generate after reset");
}
