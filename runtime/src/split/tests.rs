//! The split step's layer kinds on generated rows: shared layers read their
//! producer's rows, sliding windows see exactly their last `W` tokens, and a
//! saved state loads back into the same sequence; the fidelity check sends
//! a sampled layer astray to exact attention.

use std::sync::Arc;

use tandem_cpu::WorkerPool;
use tandem_gpu::{AttentionShape, CpuDevice, DenseDevice, KvLayer};
use tandem_kernels::rng::SplitMix64;

use super::{attend, LayerFidelity, SequenceKv, PROBE_STEPS};
use crate::policy::PolicyConfig;

const SHAPE: AttentionShape = AttentionShape {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 16,
};
const Q: usize = 4 * 16;
const KV: usize = 2 * 16;

fn random(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
        .collect()
}

fn sequence(device: &Arc<CpuDevice>, layers: &[&str]) -> SequenceKv<CpuDevice> {
    checked_sequence(device, layers, 0.0)
}

/// A sequence whose fidelity check has the bound `fidelity_check`.
fn checked_sequence(
    device: &Arc<CpuDevice>,
    layers: &[&str],
    fidelity_check: f32,
) -> SequenceKv<CpuDevice> {
    let config = PolicyConfig {
        fidelity_check,
        policy: "dense".into(),
        dense_layers: Some(Vec::new()),
        sinks: 2,
        window: 8,
        dense_below: 32,
        layers: layers
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.to_string()))
            .collect(),
        ..PolicyConfig::default()
    };
    let table = Arc::new(config.resolve(&vec![None; layers.len()]).expect("table"));
    let pool = WorkerPool::new(1).expect("pool");
    let device = Arc::clone(device);
    SequenceKv::new(device, layers.len(), SHAPE, table, Some(Arc::new(pool))).expect("sequence")
}

/// The attention output at `layer` of `seq` of one or more tokens, their
/// rows and queries given.
fn step(
    device: &CpuDevice,
    seq: &mut SequenceKv<CpuDevice>,
    layer: usize,
    [q, k, v]: [&[f32]; 3],
) -> Vec<f32> {
    let (q, k, v) = (q.to_vec(), k.to_vec(), v.to_vec());
    let tokens = q.len() / Q;
    let (mut out, mut lse) = (vec![0f32; tokens * Q], vec![0f32; tokens * 4]);
    attend(
        device,
        layer,
        &mut [(seq, 0..tokens)],
        &q,
        &k,
        &v,
        &mut out,
        &mut lse,
    )
    .expect("attend");
    out
}

/// Exact attention of `q` over the given rows, on a fresh dense cache.
fn reference(device: &CpuDevice, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let mut kv = device.kv_new(1, SHAPE).expect("kv");
    let n = k.len() / KV;
    device
        .kv_append(&mut kv, 0, &k.to_vec(), &v.to_vec(), 0..n)
        .expect("append");
    let (mut out, mut lse) = (vec![0f32; Q], vec![0f32; 4]);
    device
        .attention(
            KvLayer {
                kv: &kv,
                layer: 0,
                window: None,
                softmax: tandem_cpu::Softmax::Exact,
            },
            &q.to_vec(),
            0..1,
            &mut out,
            &mut lse,
        )
        .expect("attention");
    out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-4, "{what}: {x} vs {y}");
    }
}

#[test]
fn a_shared_layer_attends_exactly_its_producers_rows() {
    let device = Arc::new(CpuDevice::new(1));
    let mut rng = SplitMix64(11);
    let n = 64;
    let (k0, v0) = (random(n * KV, &mut rng), random(n * KV, &mut rng));
    // Layer 0 offloads its middle rows and attends them exactly; layer 1
    // attends with layer 0's rows (device window and store), layer 2 with
    // layer 0's rows while layer 0 stays whole on the device.
    for producer in ["exact", "dense"] {
        let mut seq = sequence(&device, &[producer, "shared:from=0", "shared:from=0"]);
        seq.fill(n, 1, |layer, k, v| {
            let (kl, vl) = match layer {
                0 => (k0.clone(), v0.clone()),
                _ => (
                    random(n * KV, &mut SplitMix64(99)),
                    random(n * KV, &mut SplitMix64(98)),
                ),
            };
            k.extend(kl);
            v.extend(vl);
        })
        .expect("fill");
        assert_eq!(seq.is_offloaded(), producer == "exact");
        let (k_new, v_new) = (random(KV, &mut rng), random(KV, &mut rng));
        let ignored = random(KV, &mut rng);
        let (q0, q1) = (random(Q, &mut rng), random(Q, &mut rng));
        step(&device, &mut seq, 0, [&q0, &k_new, &v_new]);
        let shared = step(&device, &mut seq, 1, [&q1, &ignored, &ignored]);
        let all_k: Vec<f32> = k0.iter().chain(&k_new).copied().collect();
        let all_v: Vec<f32> = v0.iter().chain(&v_new).copied().collect();
        let want = reference(&device, &q1, &all_k, &all_v);
        assert_close(&shared, &want, producer);
        assert_eq!(seq.layer_tokens(1), (0, 0), "a shared layer holds nothing");
        assert_eq!(seq.layer_tokens(2), (0, 0));
    }
}

#[test]
fn a_sliding_window_sees_exactly_its_last_w_tokens() {
    let device = Arc::new(CpuDevice::new(1));
    let mut rng = SplitMix64(5);
    let w = 5;
    let mut seq = sequence(&device, &["window:w=5", "shared:from=0"]);
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    let mut check_step =
        |seq: &mut SequenceKv<CpuDevice>, t: usize, ks: &mut Vec<f32>, vs: &mut Vec<f32>| {
            let (k, v, q) = (
                random(KV, &mut rng),
                random(KV, &mut rng),
                random(Q, &mut rng),
            );
            ks.truncate(t * KV);
            vs.truncate(t * KV);
            ks.extend_from_slice(&k);
            vs.extend_from_slice(&v);
            let out = step(&device, seq, 0, [&q, &k, &v]);
            let shared = step(&device, seq, 1, [&q, &k, &v]);
            let from = (t + 1).saturating_sub(w) * KV;
            let want = reference(&device, &q, &ks[from..], &vs[from..]);
            assert_close(&out, &want, &format!("token {t}"));
            assert_close(&shared, &want, &format!("shared, token {t}"));
            assert!(
                seq.layer_tokens(0).0 < 3 * w,
                "the window holds fewer than 3 W rows"
            );
            seq.advance(1);
        };
    for t in 0..31usize {
        check_step(&mut seq, t, &mut ks, &mut vs);
    }
    // Up to held - (w - 1) tokens can be undone, and the window then sees
    // the tokens before them; more cannot.
    let held = seq.layer_tokens(0).0;
    assert!(held < 31, "old rows were dropped");
    let undo = held - (w - 1);
    assert!(
        seq.truncate(31 - undo - 1).is_err(),
        "forgotten rows cannot come back"
    );
    seq.truncate(31 - undo)
        .expect("the last tokens can be undone");
    for t in 31 - undo..31 - undo + 3 {
        check_step(&mut seq, t, &mut ks, &mut vs);
    }
}

#[test]
fn a_fork_keeps_only_the_rows_its_table_keeps() {
    let device = Arc::new(CpuDevice::new(1));
    let mut rng = SplitMix64(3);
    let mut dense = sequence(&device, &["dense", "dense", "dense"]);
    let n = 20;
    dense
        .fill(n, 1, |_, k, v| {
            k.extend(random(n * KV, &mut rng));
            v.extend(random(n * KV, &mut rng));
        })
        .expect("fill");
    let table = PolicyConfig {
        policy: "dense".into(),
        dense_layers: Some(Vec::new()),
        layers: [
            (1, "window:w=6".to_string()),
            (2, "shared:from=1".to_string()),
        ]
        .into(),
        ..PolicyConfig::default()
    };
    let table = Arc::new(table.resolve(&[None; 3]).expect("table"));
    let fork = dense.fork(table, None).expect("fork");
    assert_eq!(fork.layer_tokens(0), (n, 0));
    assert_eq!(
        fork.layer_tokens(1),
        (5, 0),
        "the w - 1 rows its next query sees"
    );
    assert_eq!(fork.layer_tokens(2), (0, 0), "a shared layer holds nothing");
    assert_eq!(fork.bytes().0, (n + 5) * KV * 2 * 2);
}

#[test]
fn a_loaded_state_attends_as_the_saved_sequence_and_foreign_counts_are_refused() {
    use tandem_cpu::{ArrayReader, ArrayWriter};
    let device = Arc::new(CpuDevice::new(1));
    let mut rng = SplitMix64(5);
    let n = 48;
    let layers = ["exact", "window:w=4", "dense", "shared:from=0"];
    let mut saved = sequence(&device, &layers);
    saved
        .fill(n, 1, |_, k, v| {
            k.extend(random(n * KV, &mut rng));
            v.extend(random(n * KV, &mut rng));
        })
        .expect("fill");
    let mut out = ArrayWriter::new();
    let counts = saved.save_state(&mut out).expect("save");
    let arrays = out.into_arrays();
    let slices: Vec<&[u8]> = arrays.iter().map(Vec::as_slice).collect();

    let mut loaded = sequence(&device, &layers);
    loaded
        .load_state(&counts, n, &mut ArrayReader::new(&slices))
        .expect("load");
    assert!(loaded.is_offloaded());
    assert_eq!(loaded.positions(), n);
    let (q, k, v) = (
        random(Q, &mut rng),
        random(KV, &mut rng),
        random(KV, &mut rng),
    );
    for layer in 0..layers.len() {
        assert_eq!(loaded.layer_tokens(layer), saved.layer_tokens(layer));
        let a = step(&device, &mut saved, layer, [&q, &k, &v]);
        let b = step(&device, &mut loaded, layer, [&q, &k, &v]);
        assert_eq!(a, b, "layer {layer}");
    }

    let refused = |counts: &super::SequenceCounts, max: usize| {
        let mut fresh = sequence(&device, &layers);
        let result = fresh.load_state(counts, max, &mut ArrayReader::new(&slices));
        assert!(result.is_err(), "{counts:?}");
        assert_eq!((fresh.positions(), fresh.layer_tokens(0)), (0, (0, 0)));
    };
    refused(&counts, n - 1);
    let mut dense_with_store = counts.clone();
    dense_with_store.stored[2] = Some(1);
    refused(&dense_with_store, n);
    let mut more_rows = counts.clone();
    more_rows.device_rows[2] += 1;
    refused(&more_rows, n);
    let mut fewer_rows = counts.clone();
    fewer_rows.device_rows[2] -= 1;
    refused(&fewer_rows, n);
    let mut fewer_layers = counts.clone();
    fewer_layers.stored.pop();
    refused(&fewer_layers, n);
}

#[test]
fn the_fidelity_check_probes_exactly_and_sends_the_kv_heads_astray_to_exact_attention() {
    let device = Arc::new(CpuDevice::new(1));
    let n = 48;
    let fill = |seq: &mut SequenceKv<CpuDevice>| {
        let mut rng = SplitMix64(21);
        seq.fill(n, 1, |_, k, v| {
            k.extend(random(n * KV, &mut rng));
            v.extend(random(n * KV, &mut rng));
        })
        .expect("fill");
    };
    // The kv heads' sampled errors, from a bound every output meets.
    let errors = {
        let mut kept = checked_sequence(&device, &["topk:k=2", "exact"], 1e9);
        fill(&mut kept);
        let mut rng = SplitMix64(8);
        for _ in 0..PROBE_STEPS {
            let rows = [Q, KV, KV].map(|n| random(n, &mut rng));
            step(&device, &mut kept, 0, [&rows[0], &rows[1], &rows[2]]);
            kept.advance(1);
        }
        match &kept.fidelity()[0] {
            LayerFidelity::Checked {
                errors,
                exact_heads: 0,
            } if errors.len() == 2 && errors[0] != errors[1] => errors.clone(),
            other => panic!("not decided as kept: {other:?}"),
        }
    };
    // A bound no sampled output meets, one every output meets, one between
    // the two heads' errors, and no check.
    let between = ((errors[0] + errors[1]) / 2.0) as f32;
    let worse = usize::from(errors[1] > errors[0]);
    let mut astray = checked_sequence(&device, &["topk:k=2", "exact"], 1e-9);
    let mut kept = checked_sequence(&device, &["topk:k=2", "exact"], 1e9);
    let mut split = checked_sequence(&device, &["topk:k=2", "exact"], between);
    let mut unchecked = checked_sequence(&device, &["topk:k=2", "exact"], 0.0);
    let mut exact = checked_sequence(&device, &["exact", "exact"], 0.15);
    for seq in [
        &mut astray,
        &mut kept,
        &mut split,
        &mut unchecked,
        &mut exact,
    ] {
        fill(seq);
    }
    assert_eq!(astray.fidelity()[0], LayerFidelity::FRESH);
    assert_eq!(
        astray.fidelity()[1],
        LayerFidelity::Unchecked,
        "not sampled"
    );
    assert_eq!(
        unchecked.fidelity()[0],
        LayerFidelity::Unchecked,
        "check off"
    );
    assert_eq!(astray.fidelity_summary(), None);
    let mut rng = SplitMix64(8);
    // The query rows of kv head `h`: query heads 2h and 2h + 1.
    let head = |out: &[f32], h: usize| out[2 * h * 16..(2 * h + 2) * 16].to_vec();
    for t in 0..PROBE_STEPS as usize + 3 {
        let rows = [Q, KV, KV].map(|n| random(n, &mut rng));
        let rows = [&rows[0][..], &rows[1], &rows[2]];
        let want = step(&device, &mut exact, 0, rows);
        let sampled = step(&device, &mut unchecked, 0, rows);
        let (a, k, s) = (
            step(&device, &mut astray, 0, rows),
            step(&device, &mut kept, 0, rows),
            step(&device, &mut split, 0, rows),
        );
        assert_close(&a, &want, &format!("astray, step {t}"));
        let probing = t < PROBE_STEPS as usize;
        let expect = if probing { &want } else { &sampled };
        assert_close(&k, expect, &format!("kept, step {t}"));
        // Past the probe, only the worse head attends exactly.
        assert_close(
            &head(&s, worse),
            &head(&want, worse),
            &format!("split, worse head, step {t}"),
        );
        assert_close(
            &head(&s, 1 - worse),
            &head(expect, 1 - worse),
            &format!("split, better head, step {t}"),
        );
        if probing {
            assert_ne!(sampled, want, "top-2 of 38 random keys is not exact");
        }
        for seq in [
            &mut astray,
            &mut kept,
            &mut split,
            &mut unchecked,
            &mut exact,
        ] {
            seq.advance(1);
        }
    }
    assert_eq!(astray.fidelity()[0].exact_heads(), 0b11);
    assert_eq!(split.fidelity()[0].exact_heads(), 1 << worse);
    assert!(matches!(
        &kept.fidelity()[0],
        LayerFidelity::Checked { exact_heads: 0, errors } if errors.iter().all(|&e| e > 0.0)
    ));
    let summary = astray.fidelity_summary().expect("decided");
    assert!(
        summary.starts_with("fidelity check: exact attention for layer 0 ("),
        "{summary}"
    );
    let summary = split.fidelity_summary().expect("decided");
    assert!(
        summary.contains(&format!("layer 0 kv heads {worse} (")),
        "{summary}"
    );
    assert!(kept
        .fidelity_summary()
        .expect("decided")
        .contains("1 layer samples"));

    // New content (a step of two rows) starts the check over.
    let (q, k, v) = (
        random(2 * Q, &mut rng),
        random(2 * KV, &mut rng),
        random(2 * KV, &mut rng),
    );
    step(&device, &mut astray, 0, [&q, &k, &v]);
    assert_eq!(astray.fidelity()[0], LayerFidelity::FRESH);
}
