//! Loading: every supported tensor type against the NumPy reference, dequantization
//! of every quantized type against gguf-py bit for bit, and clear errors for bad
//! files and bad tensor data.

use std::path::{Path, PathBuf};

use tandem_gpu::{CpuDevice, HostMatrix};
use tandem_runtime::model::gguf::{GgmlType, TensorInfo};
use tandem_runtime::model::weights::{dequantize, host_matrix};
use tandem_runtime::model::{load_gguf, Logits};
use tandem_runtime::{Engine, EngineOptions};

fn scratch(name: &str) -> PathBuf {
    tandem_tests::scratch("formats", name)
}

fn make_gguf(name: &str, extra: &[&str]) -> PathBuf {
    let path = scratch(name);
    let script = root().join("tests/reference/make_gguf.py");
    let mut args = vec![
        script.to_str().expect("utf-8 path"),
        path.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    python(&args);
    path
}

#[test]
fn every_tensor_type_matches_the_reference() {
    let tokens = [72u32, 101, 108, 108, 111, 32, 33];
    for (dtype, tied) in [
        ("F32", false),
        ("F16", true),
        ("BF16", false),
        ("Q8_0", false),
        ("Q4_0", true),
        ("Q4_1", false),
        ("Q5_0", true),
        ("Q5_1", false),
    ] {
        let mut extra = vec!["--type", dtype];
        if tied {
            extra.push("--tied");
        }
        let path = make_gguf(&format!("tiny-{dtype}.gguf"), &extra);
        let want = tandem_tests::reference(&path, &tokens, &[]).logits.concat();
        let (_, model) = load_gguf(&path, CpuDevice::new(2)).expect("tiny model loads");
        let mut cache = model.new_cache().expect("cache");
        let got = model
            .forward(&tokens, &mut cache, Logits::All)
            .expect("forward");
        assert_eq!(got.len(), want.len(), "{dtype}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // bf16 KV and 16-bit activations: differences far below 1% of the logit range.
        assert!(
            max_diff <= 1e-2 * scale + 1e-5,
            "{dtype}: max |Δ| {max_diff} with logits up to {scale}"
        );
    }
}

use half::f16;
use tandem_kernels::quant::QuantizedVector;
use tandem_kernels::rng::SplitMix64 as Rng;
use tandem_tests::{python, root};

/// A random f16 scale, finite and moderate, of either sign.
fn random_scale(rng: &mut Rng) -> f16 {
    let v = (rng.next_u64() % 1000) as f32 * 1e-5;
    f16::from_f32(if rng.next_u64() & 1 == 1 { -v } else { v })
}

/// Where a block's f16 scale `d` and (for types with one) its minimum live.
fn scale_offsets(dtype: GgmlType) -> (usize, Option<usize>) {
    match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (0, None),
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => (0, Some(2)),
        GgmlType::Q6K => (208, None),
        _ => unreachable!(),
    }
}

/// Random blocks of `dtype`: every byte random (codes, packed sub-block scales)
/// except the f16 scales and minimums, which are finite and moderate.
fn random_blocks(dtype: GgmlType, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let (_, size) = dtype.block_layout().expect("supported");
    let mut bytes: Vec<u8> = (0..n_blocks * size).map(|_| rng.next_u64() as u8).collect();
    let (d_at, m_at) = scale_offsets(dtype);
    for b in bytes.chunks_exact_mut(size) {
        b[d_at..d_at + 2].copy_from_slice(&random_scale(rng).to_le_bytes());
        if let Some(m_at) = m_at {
            b[m_at..m_at + 2].copy_from_slice(&random_scale(rng).to_le_bytes());
        }
    }
    bytes
}

/// gguf-py's dequantization of raw blocks (tests/reference/dequant_ref.py).
fn gguf_py_dequantize(name: &str, bytes: &[u8]) -> Vec<f32> {
    let file = scratch(&format!("{name}.bin"));
    std::fs::write(&file, bytes).expect("write");
    let script = root().join("tests/reference/dequant_ref.py");
    let out = python(&[
        script.to_str().expect("utf-8"),
        name,
        file.to_str().expect("utf-8"),
    ]);
    serde_json::from_slice(&out).expect("json floats")
}

/// Equal bit for bit (so -0.0 differs from 0.0, and NaN payloads would count).
fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
}

fn affine(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Result<HostMatrix, String> {
    let info = TensorInfo {
        name: dtype.name(),
        dims: vec![cols as u64, rows as u64],
        dtype,
        offset: 0,
        n_bytes: bytes.len() as u64,
    };
    host_matrix(&info, bytes)
}

/// Sets every code of a Q5_0/Q5_1 block to `code` (0..=31).
fn fill_q5_codes(dtype: GgmlType, block: &mut [u8], code: u8) {
    let qh_at = if dtype == GgmlType::Q5_0 { 2 } else { 4 };
    let qh = if code >= 16 { 0xff } else { 0 };
    block[qh_at..qh_at + 4].fill(qh);
    block[qh_at + 4..qh_at + 20].fill((code & 15) * 0x11);
}

#[test]
fn block_quants_dequantize_like_gguf_py_and_repack_exactly() {
    let mut rng = Rng(11);
    // 5 blocks a row, 3 rows: odd counts of both.
    let (rows, cols) = (3, 160);
    for (dtype, name) in [
        (GgmlType::Q4_0, "Q4_0"),
        (GgmlType::Q4_1, "Q4_1"),
        (GgmlType::Q5_0, "Q5_0"),
        (GgmlType::Q5_1, "Q5_1"),
        (GgmlType::Q8_0, "Q8_0"),
    ] {
        let (_, size) = dtype.block_layout().expect("supported");
        let mut bytes = random_blocks(dtype, rows * cols / 32, &mut rng);
        // Blocks of negative and positive scale (and minimum), and for Q5 blocks of
        // only the extreme codes 0 and 31, alone and alternating with each other.
        let (d_at, m_at) = scale_offsets(dtype);
        for (k, (d, m)) in [(-0.0123f32, -0.25f32), (0.0371, 0.125), (-1.5, 3.0)]
            .into_iter()
            .enumerate()
        {
            let block = &mut bytes[k * size..(k + 1) * size];
            block[d_at..d_at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            if let Some(m_at) = m_at {
                block[m_at..m_at + 2].copy_from_slice(&f16::from_f32(m).to_le_bytes());
            }
            if matches!(dtype, GgmlType::Q5_0 | GgmlType::Q5_1) {
                fill_q5_codes(dtype, block, [0, 31, 0][k]);
                if k == 2 {
                    // Weights 16..32 at 31, 0..16 at 0.
                    let qh_at = if dtype == GgmlType::Q5_0 { 2 } else { 4 };
                    block[qh_at..qh_at + 4].copy_from_slice(&0xffff_0000u32.to_le_bytes());
                    block[qh_at + 4..qh_at + 20].fill(0xf0);
                }
            }
        }
        let want = gguf_py_dequantize(name, &bytes);
        let got = dequantize(dtype, &bytes).expect("dequantize");
        assert_bits_eq(&got, &want, name);
        if matches!(dtype, GgmlType::Q5_0 | GgmlType::Q5_1) {
            let lo = if dtype == GgmlType::Q5_0 { -16.0 } else { 0.0 };
            let d0 = f16::from_f32(-0.0123).to_f32();
            let d1 = f16::from_f32(0.0371).to_f32();
            assert_eq!(got[0], d0 * lo + if lo == 0.0 { -0.25 } else { 0.0 });
            assert_eq!(
                got[32],
                d1 * (31.0 + lo) + if lo == 0.0 { 0.125 } else { 0.0 }
            );
            assert_eq!(got[64 + 15], got[64]);
            assert_eq!(got[64 + 16] - got[64], -1.5 * 31.0);
        }

        let HostMatrix::Affine(m) = affine(dtype, rows, cols, &bytes).expect("repack") else {
            panic!("{name} should repack to an affine matrix");
        };
        let q5 = matches!(dtype, GgmlType::Q5_0 | GgmlType::Q5_1);
        assert_eq!(m.bits(), if q5 || dtype == GgmlType::Q8_0 { 8 } else { 4 });
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            if q5 {
                assert!(
                    m.row_codes(r).iter().all(|&q| q <= 31),
                    "{name}: 5-bit codes"
                );
            }
            m.dequantize_row(r, &mut row);
            // The same values (the affine form writes a zero as +0.0 where ggml's
            // `d·(q - z)` with a negative `d` gives -0.0).
            assert_eq!(row, want[r * cols..(r + 1) * cols], "{name} row {r}");
        }

        // Products with the repacked matrix agree with float products of
        // gguf-py's weights, to the activations' 16-bit quantization.
        let xs_f: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..cols).map(|_| rng.signed_f32()).collect())
            .collect();
        let xs: Vec<QuantizedVector> = xs_f.iter().map(|x| QuantizedVector::from_f32(x)).collect();
        let mut out = vec![vec![0f32; rows]; xs.len()];
        let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
        m.matmul(&xs, 0..rows, &mut outs);
        for (t, x) in xs_f.iter().enumerate() {
            for r in 0..rows {
                let w = &want[r * cols..(r + 1) * cols];
                let exact: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
                let norm: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
                assert!(
                    (out[t][r] - exact).abs() <= 1e-4 * norm + 1e-5,
                    "{name} input {t} row {r}: {} vs {exact}",
                    out[t][r]
                );
            }
        }
    }
}

#[test]
fn k_quants_dequantize_like_gguf_py_and_repack_closely() {
    let mut rng = Rng(5);
    for (dtype, name) in [
        (GgmlType::Q4K, "Q4_K"),
        (GgmlType::Q5K, "Q5_K"),
        (GgmlType::Q6K, "Q6_K"),
    ] {
        // 3 super-blocks a row, 3 rows: odd counts of both.
        let rows = 3;
        let cols = 768;
        let bytes = random_blocks(dtype, rows * cols / 256, &mut rng);
        let want = gguf_py_dequantize(name, &bytes);
        let got = dequantize(dtype, &bytes).expect("dequantize");
        assert_bits_eq(&got, &want, name);

        let HostMatrix::Affine(m) = affine(dtype, rows, cols, &bytes).expect("repack") else {
            panic!("{name} should repack to an affine matrix");
        };
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row);
            for (b, (got_block, want_block)) in row
                .chunks(32)
                .zip(want[r * cols..(r + 1) * cols].chunks(32))
                .enumerate()
            {
                let range = want_block.iter().fold(0f32, |a, v| a.max(v.abs())) * 2.0;
                for (g, w) in got_block.iter().zip(want_block) {
                    // Q4_K, Q5_K: f16 rounding of scale and minimum; Q6_K: half an
                    // 8-bit step.
                    assert!(
                        (g - w).abs() <= range / 255.0 * 0.5 + range * 2e-3 + 1e-7,
                        "{name} row {r} block {b}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_quantized_data_is_an_error_not_a_panic() {
    let mut rng = Rng(3);
    let (rows, cols) = (2, 256);
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let name = dtype.name();
        let (block, size) = dtype.block_layout().expect("supported");
        let bytes = random_blocks(dtype, rows * cols / block, &mut rng);
        assert!(affine(dtype, rows, cols, &bytes).is_ok(), "{name}");

        // Truncated data: by a byte, by a block, and none at all.
        for len in [bytes.len() - 1, bytes.len() - size, 0] {
            let msg = affine(dtype, rows, cols, &bytes[..len]).expect_err(&name);
            assert!(msg.contains("truncated") && msg.contains(&name), "{msg}");
        }
        assert!(dequantize(dtype, &bytes[..bytes.len() - 1])
            .expect_err(&name)
            .contains("not whole"));
        // Rows that are not whole blocks.
        let msg = affine(dtype, 1, block / 2, &bytes[..size / 2]).expect_err(&name);
        assert!(msg.contains("block size"), "{msg}");

        // A NaN or infinite scale in the last block.
        let (d_at, _) = scale_offsets(dtype);
        for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
            let mut corrupt = bytes.clone();
            let at = corrupt.len() - size + d_at;
            corrupt[at..at + 2].copy_from_slice(&bad.to_le_bytes());
            let msg = affine(dtype, rows, cols, &corrupt).expect_err(&name);
            assert!(
                msg.contains("not finite") && msg.contains(&format!("of row {}", rows - 1)),
                "{msg}"
            );
        }
    }
    // Q5_0's offset -16·d leaves f16's range for |d| above 4094.
    let mut bytes = random_blocks(GgmlType::Q5_0, 8, &mut rng);
    bytes[22 * 5..22 * 5 + 2].copy_from_slice(&f16::from_f32(5000.0).to_le_bytes());
    let msg = affine(GgmlType::Q5_0, 1, 256, &bytes).expect_err("overflow");
    assert!(msg.contains("weights 160..192 of row 0"), "{msg}");
}

fn load_error(path: &Path) -> String {
    match Engine::load(
        path,
        &EngineOptions {
            threads: 1,
            ..EngineOptions::default()
        },
    ) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_model_files_give_one_clear_error() {
    for dtype in ["Q4_1", "Q5_0"] {
        let truncated = make_gguf(
            &format!("truncated-{dtype}.gguf"),
            &["--type", dtype, "--truncate"],
        );
        let msg = load_error(&truncated);
        assert!(
            msg.contains(&format!("truncated-{dtype}.gguf")) && msg.contains("truncated"),
            "{msg}"
        );
    }

    let other_arch = make_gguf("gpt2.gguf", &["--type", "F32", "--arch", "gpt2"]);
    let msg = load_error(&other_arch);
    assert!(
        msg.contains("gpt2.gguf") && msg.contains("architecture `gpt2`"),
        "{msg}"
    );

    let wrong_shape = make_gguf("wrong-shape.gguf", &["--type", "F32", "--wrong-shape"]);
    let msg = load_error(&wrong_shape);
    assert!(
        msg.contains("wrong-shape.gguf") && msg.contains("has shape"),
        "{msg}"
    );

    let text = scratch("notes.txt");
    std::fs::write(&text, "this is not a model").expect("write");
    let msg = load_error(&text);
    assert!(
        msg.contains("notes.txt") && msg.contains("not a GGUF file"),
        "{msg}"
    );

    let empty = scratch("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    assert!(load_error(&empty).contains("empty.gguf"));

    let missing = scratch("missing.gguf");
    let msg = load_error(&missing);
    assert!(
        msg.contains("missing.gguf") && msg.contains("setup"),
        "{msg}"
    );

    // Every prefix of a real file's header is rejected cleanly.
    let good = make_gguf("good.gguf", &["--type", "Q8_0"]);
    let bytes = std::fs::read(&good).expect("read");
    for len in (0..bytes.len()).step_by(997) {
        let cut = scratch("cut.gguf");
        std::fs::write(&cut, &bytes[..len]).expect("write");
        let _ = load_error(&cut);
    }
}
