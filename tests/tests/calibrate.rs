//! `tandem calibrate` on the default model with a short context: the bf16
//! pair measures no error and the int8 pairs some, the search keeps the
//! budget, the policy file resolves to the chosen pairs, and a seed gives the
//! same measurements twice, under either objective. The pairs are every one the
//! store holds, so pairs added to the store are measured here too.

use tandem_bench::calibrate::pairs::{every_supported_pair, BitPair};
use tandem_bench::calibrate::{calibrate, CalibrateOptions, Objective};
use tandem_gpu::CpuDevice;
use tandem_runtime::policy::{LayerAttention, LayerPolicy, PolicyConfig};
use tandem_runtime::{Engine, EngineOptions};
use tandem_tests::model_path;

const BASE: &str = "lsh:k=10,l=75,t=2,top=128,per=32";

#[test]
fn calibration_on_the_output_measures_chooses_writes_a_loadable_file_and_repeats() {
    calibrates_under(Objective::Kl);
}

#[test]
fn calibration_on_attention_outputs_measures_chooses_writes_a_loadable_file_and_repeats() {
    calibrates_under(Objective::AttentionError);
}

fn calibrates_under(objective: Objective) {
    let engine = Engine::load_on(
        &model_path(),
        CpuDevice::new(2),
        &EngineOptions {
            threads: 2,
            cpu_workers: 2,
            policy: PolicyConfig {
                policy: "dense".into(),
                ..PolicyConfig::default()
            },
            ..EngineOptions::default()
        },
    )
    .expect("model");
    let pairs: Vec<BitPair> = every_supported_pair(BASE)
        .into_iter()
        .filter(|p| p.mean_bits(1) <= 16.0)
        .collect();
    let bf16 = BitPair::new(16, 16);
    assert!(pairs.contains(&bf16) && pairs.len() >= 3, "{pairs:?}");
    let opts = CalibrateOptions {
        text: None,
        context: 300,
        queries: 3,
        recall: 1,
        budget_bits: 10.0,
        pairs: pairs.clone(),
        int2_heads: vec![1],
        base: PolicyConfig {
            policy: BASE.into(),
            sinks: 4,
            window: 16,
            ..PolicyConfig::default()
        },
        seed: 5,
        threads: 2,
        objective,
    };
    let c = calibrate(&opts, &engine, &mut |_| {}).expect("calibrates");
    let n_layers = engine.model().config().n_layers;
    assert_eq!(c.dense_layers, [0, n_layers / 2]);
    assert_eq!(c.plan.layers.len(), n_layers - 2);
    assert!(c.skipped.is_empty());
    // Every pair, and one kv head at int2 with each pair wider than K2V2.
    let wider = pairs.iter().filter(|p| p.key > 2 || p.value > 2).count();
    for l in &c.plan.layers {
        assert_eq!(l.measured.len(), pairs.len() + wider, "layer {}", l.layer);
        for m in &l.measured {
            match m.pair == bf16 {
                // The same rows in the same format: the same output.
                true => assert_eq!(m.error, 0.0, "layer {} {}", l.layer, m.pair),
                false => assert!(m.error > 0.0, "layer {} {}", l.layer, m.pair),
            }
        }
        assert!(l.front.contains(&l.chosen));
    }
    let bits: f64 = c
        .plan
        .layers
        .iter()
        .map(|l| l.chosen.pair.mean_bits(c.plan.heads))
        .sum();
    assert!(bits / c.plan.layers.len() as f64 <= 10.0);
    assert!(
        c.plan.mean_bits() > 8.0,
        "the budget leaves room above int8"
    );

    let path = std::env::temp_dir().join(format!("tandem-calibrated-{}.toml", std::process::id()));
    std::fs::write(&path, c.to_toml()).expect("written");
    let config = PolicyConfig::from_toml_file(&path).expect("loads");
    std::fs::remove_file(&path).expect("removed");
    let table = config
        .resolve(&engine.model().config().sliding_windows())
        .expect("resolves");
    for l in &c.plan.layers {
        let chosen = LayerPolicy::parse(&l.chosen.pair.policy_string(BASE)).expect("parses");
        assert_eq!(table.layers[l.layer], chosen, "layer {}", l.layer);
    }
    for &l in &c.dense_layers {
        assert_eq!(table.layers[l].attention, LayerAttention::Dense);
    }

    // A pair's measurement depends on the seed alone, not on the other pairs.
    let two = [BitPair::new(8, 8), bf16];
    let again = calibrate(
        &CalibrateOptions {
            pairs: two.to_vec(),
            int2_heads: Vec::new(),
            ..opts
        },
        &engine,
        &mut |_| {},
    )
    .expect("calibrates again");
    assert_eq!(again.span, c.span);
    for (a, l) in again.plan.layers.iter().zip(&c.plan.layers) {
        let first: Vec<_> = l
            .measured
            .iter()
            .filter(|m| two.contains(&m.pair))
            .collect();
        let repeated: Vec<_> = a.measured.iter().collect();
        assert_eq!(repeated, first, "layer {}", l.layer);
    }
}
