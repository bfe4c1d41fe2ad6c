//! The CUDA device against the CPU device, on a GPU. Ignored by the suite
//! (no GPU there); `scripts/gpu-check.sh` runs them with `--ignored`.
//!
//! Tolerances: single operations within 1e-5 (bf16 matrix products within 2%
//! of the row's scale, the inputs being rounded to bf16); model logits within
//! 3% relative RMS of the CPU device's, the same top token at 95% of
//! positions, and the same greedy continuation.

use std::path::{Path, PathBuf};

use tandem_cuda::CudaDevice;
use tandem_gpu::{
    Activation, AttentionShape, CpuDevice, DenseDevice, HostMatrix, KvLayer, RopeStyle,
};
use tandem_kernels::ops::{argmax, Rope};
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::sas::Softmax;
use tandem_runtime::model::Logits;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{Engine, EngineOptions};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

fn gpu() -> CudaDevice {
    CudaDevice::new().unwrap_or_else(|e| panic!("no CUDA device: {e}"))
}

fn on_gpu(device: &CudaDevice, values: &[f32]) -> tandem_cuda::CudaBuffer {
    device.upload_vector(values).expect("upload")
}

fn back(device: &CudaDevice, buf: &tandem_cuda::CudaBuffer) -> Vec<f32> {
    let mut staging = Vec::new();
    let n = tandem_gpu::DeviceBuffer::len(buf);
    device
        .to_host(buf, 0..n, &mut staging)
        .expect("read")
        .to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn every_operation_matches_the_cpu_device() {
    let (gpu, cpu) = (gpu(), CpuDevice::new(4));
    let (rows, cols, tokens) = (67, 130, 3);
    let w = HostMatrix::F32 {
        rows,
        cols,
        data: random(rows * cols, 1),
    };
    let xs = random(tokens * cols, 2);
    let mut want = vec![0f32; tokens * rows];
    cpu.matmul(&w, &xs, &mut want).expect("cpu matmul");
    let gw = gpu.upload(w).expect("upload");
    let mut ys = gpu.zeros(tokens * rows).expect("zeros");
    gpu.matmul(&gw, &on_gpu(&gpu, &xs), &mut ys)
        .expect("matmul");
    assert!(max_diff(&back(&gpu, &ys), &want) < 0.02 * (cols as f32).sqrt());

    let (width, head_dim) = (5 * 38, 38);
    let x = random(tokens * width, 3);
    let weight = random(width, 4);
    let mut want = vec![0f32; x.len()];
    cpu.rms_norm(&x, &weight, 1e-6, &mut want).expect("norm");
    let mut out = gpu.zeros(x.len()).expect("zeros");
    gpu.rms_norm(&on_gpu(&gpu, &x), &on_gpu(&gpu, &weight), 1e-6, &mut out)
        .expect("norm");
    assert!(max_diff(&back(&gpu, &out), &want) < 1e-5, "rms norm");

    let rope = Rope::new(head_dim, 10000.0);
    let mut angles = Vec::new();
    for p in [0, 17, 4093] {
        rope.push_angles(p, &mut angles);
    }
    for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
        let mut want = x.clone();
        cpu.rope(&mut want, head_dim, &angles, style).expect("rope");
        let mut got = on_gpu(&gpu, &x);
        gpu.rope(&mut got, head_dim, &on_gpu(&gpu, &angles), style)
            .expect("rope");
        assert!(max_diff(&back(&gpu, &got), &want) < 1e-5, "{style:?}");
    }
    let up = random(x.len(), 5);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let mut want = x.clone();
        cpu.glu(act, &mut want, &up).expect("glu");
        let mut got = on_gpu(&gpu, &x);
        gpu.glu(act, &mut got, &on_gpu(&gpu, &up)).expect("glu");
        assert!(max_diff(&back(&gpu, &got), &want) < 1e-5, "{act:?}");
    }
    let mut got = on_gpu(&gpu, &x);
    gpu.add(&mut got, &on_gpu(&gpu, &up)).expect("add");
    gpu.scale(&mut got, 0.5).expect("scale");
    gpu.add_bias(&mut got, &on_gpu(&gpu, &weight))
        .expect("bias");
    let mut want = x.clone();
    cpu.add(&mut want, &up).expect("add");
    cpu.scale(&mut want, 0.5).expect("scale");
    cpu.add_bias(&mut want, &weight).expect("bias");
    assert!(
        max_diff(&back(&gpu, &got), &want) < 1e-6,
        "add, scale, bias"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn the_window_and_its_attention_match_the_cpu_device() {
    let (gpu, cpu) = (gpu(), CpuDevice::new(4));
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 40,
    };
    let (n, width) = (1301, 2 * 40);
    let (k, v) = (random(n * width, 6), random(n * width, 7));
    let mut ckv = cpu.kv_new(1, shape).expect("kv");
    cpu.kv_append(&mut ckv, 0, &k, &v, 0..n).expect("append");
    let mut gkv = gpu.kv_new(1, shape).expect("kv");
    let (gk, gv) = (on_gpu(&gpu, &k), on_gpu(&gpu, &v));
    gpu.kv_append(&mut gkv, 0, &gk, &gv, 0..700)
        .expect("append");
    gpu.kv_append(&mut gkv, 0, &gk, &gv, 700..n)
        .expect("append");
    let (mut ck, mut cv, mut gk2, mut gv2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    cpu.kv_take(&mut ckv, 0, 3, 200, &mut ck, &mut cv)
        .expect("take");
    gpu.kv_take(&mut gkv, 0, 3, 200, &mut gk2, &mut gv2)
        .expect("take");
    assert_eq!((ck, cv), (gk2, gv2), "taken rows");
    cpu.kv_discard(&mut ckv, 0, 1, 1).expect("discard");
    gpu.kv_discard(&mut gkv, 0, 1, 1).expect("discard");
    assert_eq!(gpu.kv_len(&gkv, 0), cpu.kv_len(&ckv, 0));
    for (tokens, window) in [(1, None), (5, None), (3, Some(700))] {
        let q = random(tokens * 6 * 40, 8);
        let mut want = (vec![0f32; q.len()], vec![0f32; tokens * 6]);
        cpu.attention(
            KvLayer {
                kv: &ckv,
                layer: 0,
                window,
                softmax: Softmax::Exact,
            },
            &q,
            0..tokens,
            &mut want.0,
            &mut want.1,
        )
        .expect("attention");
        let (mut out, mut lse) = (
            gpu.zeros(q.len()).expect("z"),
            gpu.zeros(tokens * 6).expect("z"),
        );
        gpu.attention(
            KvLayer {
                kv: &gkv,
                layer: 0,
                window,
                softmax: Softmax::Exact,
            },
            &on_gpu(&gpu, &q),
            0..tokens,
            &mut out,
            &mut lse,
        )
        .expect("attention");
        assert!(
            max_diff(&back(&gpu, &out), &want.0) < 1e-4,
            "{tokens} {window:?}"
        );
        assert!(
            max_diff(&back(&gpu, &lse), &want.1) < 1e-4,
            "{tokens} {window:?}"
        );
    }
    let (out, lse) = (random(2 * 6 * 40, 9), random(2 * 6, 10));
    let (part_out, part_lse) = (random(6 * 40, 11), random(6, 12));
    let mut want = out.clone();
    cpu.merge_partials(&mut want, &lse, 1..2, &part_out, &part_lse)
        .expect("merge");
    let mut got = on_gpu(&gpu, &out);
    gpu.merge_partials(&mut got, &on_gpu(&gpu, &lse), 1..2, &part_out, &part_lse)
        .expect("merge");
    assert!(max_diff(&back(&gpu, &got), &want) < 1e-6, "merge");
}

fn model(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

fn options(policy: &str) -> EngineOptions {
    EngineOptions {
        threads: 8,
        cpu_workers: 8,
        policy: PolicyConfig {
            policy: policy.into(),
            window: 16,
            sinks: 4,
            dense_below: 0,
            ..PolicyConfig::default()
        },
        ..EngineOptions::default()
    }
}

/// Logits of every position of a prefill, then of `steps` greedy decode steps.
fn run<D: DenseDevice>(engine: &Engine<D>, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let model = engine.model();
    let mut kv = model.new_cache().expect("cache");
    let logits = model
        .forward(prompt, &mut kv, Logits::All)
        .expect("prefill");
    let vocab = logits.len() / prompt.len();
    let mut next = argmax(&logits[logits.len() - vocab..]).expect("a token") as u32;
    let mut greedy = vec![next];
    for _ in 0..steps {
        let l = model.forward(&[next], &mut kv, Logits::Last).expect("step");
        next = argmax(&l).expect("a token") as u32;
        greedy.push(next);
    }
    (logits, greedy)
}

fn compare(file: &str, policy: &str) {
    let path = model(file);
    let cpu = Engine::load(&path, &options(policy)).expect("cpu engine");
    let gpu = Engine::load_on(&path, gpu(), &options(policy)).expect("gpu engine");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let prompt = cpu.tokenizer().encode(&text, true).expect("tokens");
    let (want, want_greedy) = run(&cpu, &prompt, 24);
    let (got, got_greedy) = run(&gpu, &prompt, 24);
    let vocab = want.len() / prompt.len();
    let (mut err, mut norm, mut same_top) = (0f64, 0f64, 0);
    for (w, g) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
        err += w
            .iter()
            .zip(g)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        norm += w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
        same_top += usize::from(argmax(w) == argmax(g));
    }
    let rel = (err / norm).sqrt();
    println!(
        "{file} ({policy}): logits relative RMS error {rel:.4}, top-1 equal at {same_top}/{} positions",
        prompt.len()
    );
    assert!(rel < 0.03, "relative RMS error {rel}");
    assert!(
        same_top * 100 >= prompt.len() * 95,
        "top-1 agreement {same_top}"
    );
    assert_eq!(got_greedy, want_greedy, "greedy continuation");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn smollm2_logits_match_the_cpu_device() {
    compare("SmolLM2-135M-Instruct.Q4_1.gguf", "dense");
    // The split step: every row past the sinks and window offloaded to the
    // CPU workers, attended exactly there and merged on the GPU.
    compare("SmolLM2-135M-Instruct.Q4_1.gguf", "exact");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gemma3_logits_match_the_cpu_device() {
    compare("gemma-3-270m-q4_k_m.gguf", "dense");
}
