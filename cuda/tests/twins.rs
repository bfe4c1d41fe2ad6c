//! The kernels' CPU twins against the CPU device, on random inputs of odd sizes.

use half::bf16;
use tandem_cuda::{twin, Geometry};
use tandem_gpu::{
    Activation, AttentionShape, CpuDevice, DenseDevice, HostMatrix, KvLayer, RopeStyle,
};
use tandem_kernels::ops::Rope;
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::sas::Softmax;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let ok = (a - b).abs() <= tol * (1.0 + b.abs()) || (a == b);
        assert!(ok, "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn row_kernels_match_the_cpu_device() {
    let device = CpuDevice::new(1);
    let (rows, width, head_dim) = (3, 5 * 38, 38);
    let xs = random(rows * width, 1);
    let weight = random(width, 2);
    let mut want = vec![0f32; xs.len()];
    device
        .rms_norm(&xs, &weight, 1e-6, &mut want)
        .expect("rms norm");
    let mut got = vec![0f32; xs.len()];
    for (o, x) in got.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
        twin::rms_norm(x, &weight, 1e-6, o);
    }
    assert_close(&got, &want, 1e-6, "rms_norm");

    let rope = Rope::new(head_dim, 10000.0);
    let mut angles = Vec::new();
    for p in [0, 17, 4093] {
        rope.push_angles(p, &mut angles);
    }
    for (style, halves) in [(RopeStyle::Interleaved, false), (RopeStyle::Halves, true)] {
        let mut want = xs.clone();
        device
            .rope(&mut want, head_dim, &angles, style)
            .expect("rope");
        let mut got = xs.clone();
        twin::rope(&mut got, width, head_dim, &angles, halves);
        assert_eq!(got, want, "rope {style:?}");
    }
}

#[test]
fn element_kernels_match_the_cpu_device() {
    let device = CpuDevice::new(1);
    let (gate, up) = (random(1001, 3), random(1001, 4));
    for activation in [Activation::Silu, Activation::GeluTanh] {
        let mut want = gate.clone();
        device.glu(activation, &mut want, &up).expect("glu");
        let mut got = gate.clone();
        match activation {
            Activation::Silu => twin::silu_mul(&mut got, &up),
            Activation::GeluTanh => twin::gelu_tanh_mul(&mut got, &up),
        }
        assert_eq!(got, want, "{activation:?}");
    }
    let bias = random(13, 14);
    let mut want = gate
        .iter()
        .take(1001 / 13 * 13)
        .copied()
        .collect::<Vec<_>>();
    let mut got = want.clone();
    device
        .add(&mut want, &up[..got.len()].to_vec())
        .expect("add");
    device.scale(&mut want, -0.3).expect("scale");
    device.add_bias(&mut want, &bias).expect("bias");
    twin::add(&mut got, &up);
    twin::scale(&mut got, -0.3);
    twin::add_bias(&mut got, &bias);
    assert_eq!(got, want, "add, scale, add_bias");
    // Ties both ways, the largest finite values, infinities, NaNs, subnormals.
    let mut specials: Vec<f32> = [
        0x3f80_8000u32,
        0x3f81_8000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f80_0000,
        0x7fc0_0001,
        0xff80_0001,
        0x0000_8001,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    specials.extend(random(1000, 13).iter().map(|x| x * 1e3));
    for (got, x) in twin::to_bf16(&specials).iter().zip(&specials) {
        let want = bf16::from_f32(*x);
        let same = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
        assert!(same, "{x:e}: {got} vs {want}");
    }
}

#[test]
fn embedding_matches_the_cpu_device() {
    let device = CpuDevice::new(1);
    let (rows, cols) = (11, 37);
    let data = twin::to_bf16(&random(rows * cols, 5));
    let tokens = [10u32, 0, 3, 3];
    let mut got = vec![0f32; tokens.len() * cols];
    twin::embed(&data, &tokens, cols, &mut got);
    let table = HostMatrix::Bf16 { rows, cols, data };
    let mut want = vec![0f32; got.len()];
    device.embed(&table, &tokens, &mut want).expect("embed");
    assert_eq!(got, want);
}

/// A window of `rows` random rows, on the CPU device and in the CUDA
/// device's row-major bf16 layout.
fn window(shape: AttentionShape, rows: usize) -> (tandem_gpu::CpuKv, Vec<bf16>, Vec<bf16>) {
    let device = CpuDevice::new(1);
    let width = shape.n_kv_heads * shape.head_dim;
    let k: Vec<f32> = random(rows * width, 6).iter().map(|x| x * 3.0).collect();
    let v = random(rows * width, 7);
    let mut kv = device.kv_new(1, shape).expect("kv");
    device
        .kv_append(&mut kv, 0, &k, &v, 0..rows)
        .expect("append");
    (kv, twin::to_bf16(&k), twin::to_bf16(&v))
}

#[test]
fn attention_matches_the_cpu_device_over_several_splits() {
    let device = CpuDevice::new(2);
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 40,
    };
    let rows = 1301;
    let (kv, keys, values) = window(shape, rows);
    let width = shape.n_heads * shape.head_dim;
    for (tokens, window) in [(1, None), (5, None), (3, Some(700)), (1, Some(129))] {
        let q = random(tokens * width, 8 + tokens as u64);
        let (mut want, mut want_lse) = (vec![0f32; q.len()], vec![0f32; tokens * shape.n_heads]);
        let at = KvLayer {
            kv: &kv,
            layer: 0,
            window,
            softmax: Softmax::Exact,
        };
        device
            .attention(at, &q, 0..tokens, &mut want, &mut want_lse)
            .expect("attention");
        let g = Geometry::new(shape, rows - tokens, tokens, window);
        assert!(g.splits >= 2 || window == Some(129));
        let (mut got, mut got_lse) = (vec![0f32; q.len()], vec![0f32; want_lse.len()]);
        twin::attention(&q, &keys, &values, &g, &mut got, &mut got_lse);
        let what = format!("{tokens} queries, window {window:?}");
        assert_close(&got, &want, 2e-5, &what);
        assert_close(&got_lse, &want_lse, 2e-6, &what);
    }
}

#[test]
fn merge_matches_the_cpu_device() {
    let device = CpuDevice::new(1);
    let (rows, heads, d) = (3, 5, 19);
    let out = random(rows * heads * d, 9);
    let lse = random(rows * heads, 10);
    let part_out = random(rows * heads * d, 11);
    let mut part_lse = random(rows * heads, 12);
    part_lse[2] = f32::NEG_INFINITY;
    let mut want = out.clone();
    device
        .merge_partials(&mut want, &lse, 0..rows, &part_out, &part_lse)
        .expect("merge");
    let mut got = out.clone();
    twin::merge(&mut got, &lse, &part_out, &part_lse, d);
    assert_eq!(got, want);
}
