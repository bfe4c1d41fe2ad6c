//! Loading: every supported tensor type against the NumPy reference, dequantization
//! of K-quants against gguf-py, and clear errors for bad files.

use std::path::{Path, PathBuf};
use std::process::Command;

use tandem_gpu::{CpuDevice, HostMatrix};
use tandem_runtime::model::gguf::{GgmlType, TensorInfo};
use tandem_runtime::model::weights::{dequantize, host_matrix};
use tandem_runtime::model::{load_gguf, Logits};
use tandem_runtime::{Engine, EngineOptions};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn python(args: &[&str]) -> Vec<u8> {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("python3 runs (installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
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
    ] {
        let mut extra = vec!["--type", dtype];
        if tied {
            extra.push("--tied");
        }
        let path = make_gguf(&format!("tiny-{dtype}.gguf"), &extra);
        let json_path = scratch(&format!("tiny-{dtype}.json"));
        let ids: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let ids = ids.join(",");
        let script = root().join("tests/reference/llama_ref.py");
        python(&[
            script.to_str().expect("utf-8"),
            "--model",
            path.to_str().expect("utf-8"),
            "--tokens",
            &ids,
            "--out",
            json_path.to_str().expect("utf-8"),
        ]);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json_path).expect("json")).expect("json");
        let want: Vec<f32> = json["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .expect("row")
                    .iter()
                    .map(|v| v.as_f64().expect("f") as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
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

use tandem_kernels::rng::SplitMix64 as Rng;
use tandem_tests::root;

/// Random K-quant blocks whose f16 scales are finite and moderate.
fn random_blocks(dtype: GgmlType, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let (_, size) = dtype.block_layout().expect("supported");
    let mut bytes: Vec<u8> = (0..n_blocks * size).map(|_| rng.next_u64() as u8).collect();
    for b in bytes.chunks_exact_mut(size) {
        let scale = |rng: &mut Rng| {
            half::f16::from_f32((rng.next_u64() % 1000) as f32 * 1e-5).to_le_bytes()
        };
        match dtype {
            GgmlType::Q4K => {
                let (d, dmin) = (scale(rng), scale(rng));
                b[0..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&dmin);
            }
            GgmlType::Q6K => {
                let d = scale(rng);
                b[208..210].copy_from_slice(&d);
            }
            _ => unreachable!(),
        }
    }
    bytes
}

#[test]
fn k_quants_dequantize_like_gguf_py_and_repack_closely() {
    let mut rng = Rng(5);
    for (dtype, name) in [(GgmlType::Q4K, "Q4_K"), (GgmlType::Q6K, "Q6_K")] {
        let rows = 3;
        let cols = 512;
        let bytes = random_blocks(dtype, rows * cols / 256, &mut rng);
        let file = scratch(&format!("{name}.bin"));
        std::fs::write(&file, &bytes).expect("write");
        let script = root().join("tests/reference/dequant_ref.py");
        let out = python(&[
            script.to_str().expect("utf-8"),
            name,
            file.to_str().expect("utf-8"),
        ]);
        let want: Vec<f32> = serde_json::from_slice(&out).expect("json floats");
        let got = dequantize(dtype, &bytes).expect("dequantize");
        assert_eq!(got, want, "{name}: dequantization differs from gguf-py");

        let info = TensorInfo {
            name: name.into(),
            dims: vec![cols as u64, rows as u64],
            dtype,
            offset: 0,
            n_bytes: bytes.len() as u64,
        };
        let HostMatrix::Affine(m) = host_matrix(&info, &bytes).expect("repack") else {
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
                    // Q4_K: f16 rounding of scale and minimum; Q6_K: half an 8-bit step.
                    assert!(
                        (g - w).abs() <= range / 255.0 * 0.5 + range * 2e-3 + 1e-7,
                        "{name} row {r} block {b}: {g} vs {w}"
                    );
                }
            }
        }
    }
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
    let truncated = make_gguf("truncated.gguf", &["--type", "Q4_1", "--truncate"]);
    let msg = load_error(&truncated);
    assert!(
        msg.contains("truncated.gguf") && msg.contains("truncated"),
        "{msg}"
    );

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
