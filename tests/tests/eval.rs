//! `tandem eval` on the default model: dense against itself is exact, a broken
//! policy is reported as worse, and the outputs are valid.

use tandem_bench::eval::needle::NeedleTask;
use tandem_bench::eval::{report, run_eval, EvalOptions};
use tandem_runtime::policy::PolicyConfig;
use tandem_tests::model_path;

#[test]
fn dense_is_exact_a_one_token_window_is_worse_and_outputs_are_valid() {
    let model = model_path();
    let opts = EvalOptions {
        model,
        policies: vec![
            "dense".into(),
            "window".into(),
            "lsh:k=6,l=120".into(),
            "lsh:k=6,l=120,top=16".into(),
        ],
        contexts: vec![1024],
        scored: 24,
        needle_cases: 3,
        needle_tasks: vec![NeedleTask::Single, NeedleTask::MULTI_KEY],
        base: PolicyConfig {
            window: 1,
            sinks: 1,
            ..PolicyConfig::default()
        },
        threads: 2,
        cpu_workers: 2,
        diagnose: Some(16),
    };
    let rows = run_eval(&opts, &mut |_| {}).expect("eval");
    assert_eq!(rows.len(), 4);
    let (dense, window, lsh, safe) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    assert_eq!(dense.top1_agreement, 1.0);
    assert!(dense.mean_kl.abs() < 1e-9, "{}", dense.mean_kl);
    assert_eq!(dense.ppl, dense.dense_ppl);
    assert_eq!(dense.needle_accuracy, dense.dense_needle_accuracy);
    let tasks: Vec<&str> = dense.needles.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(tasks, ["single", "multikey"]);
    for s in &dense.needles {
        assert_eq!(
            s.accuracy, s.dense_accuracy,
            "dense against itself, {}",
            s.task
        );
        assert_eq!(s.cases, 3);
    }
    assert!(report::needle_table(&rows).contains("| multikey |"));
    assert!(window.mean_kl > 0.05, "window KL {}", window.mean_kl);
    assert!(window.top1_agreement < 1.0);
    assert!(window.keys_touched_fraction < dense.keys_touched_fraction);
    assert!(
        lsh.mean_kl < window.mean_kl,
        "lsh {} vs window {}",
        lsh.mean_kl,
        window.mean_kl
    );
    // The safety set takes the heavy keys out of the sample's variance.
    assert!(
        safe.mean_kl < lsh.mean_kl,
        "lsh with a safety set {} vs lsh {}",
        safe.mean_kl,
        lsh.mean_kl
    );
    // The diagnosis: masses are fractions of each head's softmax, LSH misses
    // no more with the safety set than without, and dense has no index.
    assert!(dense.per_head.is_empty());
    assert_eq!(lsh.per_head.len(), 28 * 3, "sparse layers x kv heads");
    for h in &lsh.per_head {
        assert!((0.0..=1.0).contains(&h.offloaded_mass), "{h:?}");
        assert!(h.tail_mass <= h.offloaded_mass + 1e-9, "{h:?}");
        assert!(h.lsh_missed <= h.offloaded_mass + 1e-9, "{h:?}");
        assert!(h.lsh_missed_with_top <= h.lsh_missed + 1e-12, "{h:?}");
        assert!((0.0..=1.0).contains(&h.missed_norm_rank), "{h:?}");
    }
    let mean_missed = lsh.per_head.iter().map(|h| h.lsh_missed).sum::<f64>();
    let mean_with_top = lsh
        .per_head
        .iter()
        .map(|h| h.lsh_missed_with_top)
        .sum::<f64>();
    assert!(mean_missed > 0.0 && mean_with_top < mean_missed);
    assert!(report::head_tables(&rows, 16).contains("| mean |"));
    let sparse_layer = &lsh.per_layer[1];
    assert!(sparse_layer.rel_l2_error.is_some_and(|e| e > 0.0));
    assert!(sparse_layer.cosine.is_some_and(|c| c > 0.5));
    // A dense layer offloads nothing: its error is not observed, not zero.
    assert_eq!(lsh.per_layer[0].rel_l2_error, None);
    assert!(sparse_layer.keys_touched_fraction < 1.0);
    // Outputs.
    let json: serde_json::Value = serde_json::from_str(&report::to_json(&rows)).expect("json");
    let first = &json.as_array().expect("array")[0];
    for field in [
        "policy",
        "context",
        "top1_agreement",
        "mean_kl",
        "ppl",
        "dense_ppl",
        "needle_accuracy",
        "dense_needle_accuracy",
        "keys_touched_fraction",
    ] {
        assert!(first.get(field).is_some(), "missing {field}");
    }
    let svg = report::svg_plot(&rows);
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..40]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(report::markdown_table(&rows).lines().count() >= 5);
}
