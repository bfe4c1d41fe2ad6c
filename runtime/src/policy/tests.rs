//! Tests of policy strings, files and tables.

use super::*;
use tandem_cpu::Precision;

#[test]
fn the_fidelity_check_is_read_from_a_policy_file_and_checked() {
    let config = PolicyConfig::from_toml_str("fidelity_check = 0.3", "t.toml").expect("toml");
    let table = config.resolve(&[None; 4]).expect("table");
    assert_eq!(table.fidelity_check, 0.3);
    assert!(table.is_checked() && table.is_sampled(1) && !table.is_sampled(0));
    assert!(table.to_string().contains("fidelity check"));
    let off = PolicyConfig::from_toml_str("fidelity_check = 0.0", "t.toml").expect("toml");
    assert!(!off.resolve(&[None; 4]).expect("table").is_checked());
    for bad in ["-0.5", "nan", "inf"] {
        let text = format!("fidelity_check = {bad}");
        let config = PolicyConfig::from_toml_str(&text, "t.toml").expect("toml");
        assert!(config.validate().is_err(), "{bad}");
    }
    assert_eq!(
        PolicyConfig::default().fidelity_check,
        DEFAULT_FIDELITY_CHECK
    );
}

#[test]
fn sinks_and_window_near_the_top_of_usize_are_refused() {
    let huge = PolicyConfig {
        sinks: 4,
        window: usize::MAX - 2,
        ..PolicyConfig::default()
    };
    let err = huge.resolve(&[None; 30]).unwrap_err().to_string();
    assert!(err.contains("beyond any context"), "{err}");
    assert!(huge.validate().is_err());
    assert!(PolicyConfig::default().validate().is_ok());
    let bad = PolicyConfig {
        policy: "lsh:k=99".into(),
        ..PolicyConfig::default()
    };
    assert!(bad.validate().is_err());
}

#[test]
fn defaults_follow_magicpig() {
    let t = PolicyConfig::default().resolve(&[None; 30]).expect("table");
    assert_eq!(t.layers[0].attention, LayerAttention::Dense);
    assert_eq!(t.layers[15].attention, LayerAttention::Dense);
    assert!(matches!(
        t.layers[1].attention,
        LayerAttention::Offloaded {
            lsh: Some(LshIndexParams { k: 10, l: 75, t: 2 }),
            policy: Policy::Lsh(tandem_cpu::LshParams {
                top: 128,
                per: 32,
                ..
            }),
            ..
        }
    ));
    assert_eq!((t.sinks, t.window), (4, 64));
    let shown = t.to_string();
    assert!(
        shown.contains("layers 1-14,16-29: lsh:k=10,l=75,t=2,top=128,per=32"),
        "{shown}"
    );
    assert!(shown.contains("layers 0,15: dense\n"), "{shown}");
    assert!(
        shown.contains("per=32 (keys bf16, values bf16)\n"),
        "{shown}"
    );
    let c: PolicyConfig = toml::from_str("policy = \"topk:k=64,kbits=4,vbits=2\"").expect("toml");
    let shown = c.resolve(&[None; 30]).expect("table").to_string();
    assert!(
        shown.contains("kbits=4,vbits=2 (keys int4, values int2)"),
        "{shown}"
    );
}

#[test]
fn layouts_resolve_to_windows_and_shared_layers_and_bad_references_fail() {
    let c: PolicyConfig =
        toml::from_str("layout = \"ma-pairs\"\nlayout_window = 512\n[layers]\n4 = \"dense\"\n")
            .expect("toml");
    let t = c.resolve(&[None; 24]).expect("table");
    assert!(matches!(
        t.layers[0].attention,
        LayerAttention::Offloaded { .. }
    ));
    assert_eq!(
        t.layers[1].attention,
        LayerAttention::Window { size: Some(512) }
    );
    assert_eq!(t.layers[2].attention, LayerAttention::Shared { from: 1 });
    assert_eq!(
        t.layers[4].attention,
        LayerAttention::Dense,
        "overrides win"
    );
    assert_eq!(t.layers[6].attention, LayerAttention::Shared { from: 0 });
    assert_eq!((t.source(6), t.sliding_window(2)), (0, Some(512)));
    assert!(t.needs_workers());
    let shown = t.to_string();
    assert!(shown.contains("shared:from=1"), "{shown}");
    let bad = |layers: &[(usize, &str)]| PolicyConfig {
        layers: layers.iter().map(|(l, p)| (*l, p.to_string())).collect(),
        ..PolicyConfig::default()
    };
    assert!(
        bad(&[(3, "shared:from=5")]).resolve(&[None; 8]).is_err(),
        "forward"
    );
    assert!(
        bad(&[(3, "shared:from=3")]).resolve(&[None; 8]).is_err(),
        "itself"
    );
    assert!(bad(&[(2, "shared:from=1"), (3, "shared:from=2")])
        .resolve(&[None; 8])
        .is_err());
    assert!(bad(&[(3, "shared:from=1")]).resolve(&[None; 8]).is_ok());
    assert!(bad(&[(3, "window:w=0")]).resolve(&[None; 8]).is_err());
    assert!(bad(&[(3, "shared:frm=1")]).resolve(&[None; 8]).is_err());
    let unknown = PolicyConfig {
        layout: Some("ma-triples".into()),
        ..PolicyConfig::default()
    };
    assert!(unknown.resolve(&[None; 8]).is_err());
}

#[test]
fn the_models_sliding_window_layers_keep_their_window() {
    // Gemma 3's pattern: five local layers of 512, then a global one.
    let windows: Vec<Option<usize>> = (0..12).map(|l| ((l + 1) % 6 != 0).then_some(512)).collect();
    let t = PolicyConfig::default().resolve(&windows).expect("table");
    for (l, w) in windows.iter().enumerate() {
        if w.is_some() {
            assert_eq!(t.sliding_window(l), Some(512), "layer {l}");
        } else {
            assert!(matches!(
                t.layers[l].attention,
                LayerAttention::Offloaded { .. }
            ));
        }
    }
    let shown = t.to_string();
    assert!(
        shown.contains("layers 0-4,6-10: window:w=512 (the model's local layers)"),
        "{shown}"
    );
    assert_eq!(PolicyTable::dense(&windows).sliding_window(3), Some(512));
    assert!(!PolicyTable::dense(&windows).is_sparse());
    let naming = |c: PolicyConfig| c.resolve(&windows).map_err(|e| e.to_string());
    let err = naming(PolicyConfig {
        dense_layers: Some(vec![2]),
        ..PolicyConfig::default()
    })
    .expect_err("a local layer named dense");
    assert!(
        err.contains("layer 2 is one of the model's sliding-window layers"),
        "{err}"
    );
    assert!(naming(PolicyConfig {
        layers: [(3, "topk:k=8".to_string())].into(),
        ..PolicyConfig::default()
    })
    .is_err());
    assert!(naming(PolicyConfig {
        layers: [(5, "topk:k=8".to_string())].into(),
        ..PolicyConfig::default()
    })
    .is_ok());
    assert!(naming(PolicyConfig {
        layout: Some("ma-pairs".into()),
        ..PolicyConfig::default()
    })
    .is_err());
}

#[test]
fn the_softmax_mode_reaches_each_layer_and_shared_layers_take_their_producers() {
    let c = PolicyConfig {
        policy: "lsh:k=10,l=75,softmax=sas".into(),
        layers: [
            (2, "dense:softmax=sas,sas_n=4".to_string()),
            (3, "shared:from=1".to_string()),
            (4, "topk:k=8".to_string()),
        ]
        .into(),
        ..PolicyConfig::default()
    };
    let t = c.resolve(&[None; 8]).expect("table");
    let sas = |cutoff| Softmax::Sas { cutoff };
    let modes: Vec<Softmax> = (0..8).map(|l| t.softmax(l)).collect();
    let exact = Softmax::Exact;
    assert_eq!(
        modes,
        [exact, sas(8), sas(4), sas(8), exact, sas(8), sas(8), sas(8)]
    );
    assert_eq!(t.layers[2].attention, LayerAttention::Dense);
    assert!(t
        .to_string()
        .contains("layers 1,5-7: lsh:k=10,l=75,softmax=sas"));
    assert!(LayerPolicy::parse("window:softmax=sas").is_err());
    assert!(LayerPolicy::parse("dense:softmax=sas,sas_n=17").is_err());
}

#[test]
fn an_unknown_kind_lists_every_kind_and_every_listed_kind_parses() {
    let err = LayerPolicy::parse("sparse:k=4").unwrap_err().to_string();
    let kinds = policy_kinds();
    for kind in [
        "dense",
        "topk",
        "oracle",
        "lsh",
        "threshold",
        "window",
        "shared",
        "exact",
    ] {
        assert!(kinds.contains(&kind), "{kind} is not listed");
        assert!(err.contains(kind), "{kind} is missing from: {err}");
    }
    for spec in [
        "dense",
        "topk:k=8",
        "oracle:budget=8",
        "lsh:k=10,l=75",
        "threshold:eps=0.1",
        "window",
        "shared:from=0",
        "exact",
    ] {
        let kind = spec.split(':').next().unwrap_or(spec);
        assert!(kinds.contains(&kind), "{spec} parses but is not listed");
        assert!(LayerPolicy::parse(spec).is_ok(), "{spec}");
    }
    assert_eq!(kinds.len(), 8);
}

#[test]
fn exact_takes_a_storage_and_dense_refuses_one() {
    let l = LayerPolicy::parse("exact:kbits=4,vbits=2,int2_heads=1,softmax=sas").expect("parses");
    let want = KvDtype::new(Precision::Int4, Precision::Int2).with_int2_heads(1);
    assert!(
        matches!(
            l.attention,
            LayerAttention::Offloaded { policy: Policy::Dense, lsh: None, kv_dtype } if kv_dtype == want
        ),
        "{l:?}"
    );
    assert_eq!(l.softmax, Softmax::Sas { cutoff: 8 });
    assert!(matches!(
        LayerPolicy::parse("exact").expect("parses").attention,
        LayerAttention::Offloaded {
            kv_dtype: KvDtype::BF16,
            ..
        }
    ));
    let err = LayerPolicy::parse("exact:k=3").unwrap_err().to_string();
    assert!(err.contains("\"exact:k=3\""), "{err}");
    let err = LayerPolicy::parse("dense:kbits=4,vbits=4")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`exact`"), "{err}");
    assert_eq!(
        LayerPolicy::parse("dense:kbits=16")
            .expect("bf16 is the device's")
            .attention,
        LayerAttention::Dense
    );
}

#[test]
fn toml_errors_name_the_line_and_column() {
    let text = "policy = \"dense\"\nsinks = 4\n  window = \"wide\"\n";
    let err = PolicyConfig::from_toml_str(text, "p.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("policy file p.toml, line 3, column 12:"),
        "{err}"
    );
    let err = PolicyConfig::from_toml_str("sinks = 1\npolcy = 2", "p.toml").unwrap_err();
    assert!(err.to_string().contains("line 2, column 1"), "{err}");
    assert_eq!(line_column("a\néb", 4), (2, 2));
}

#[test]
fn toml_overrides_and_errors() {
    let c: PolicyConfig = toml::from_str(
        "policy = \"topk:k=32\"\ndense_layers = [1]\nwindow = 16\n[layers]\n3 = \"window\"\n",
    )
    .expect("toml");
    let t = c.resolve(&[None; 4]).expect("table");
    assert_eq!(t.layers[1].attention, LayerAttention::Dense);
    assert_eq!(t.layers[3].attention, LayerAttention::Window { size: None });
    assert!(matches!(
        t.layers[0].attention,
        LayerAttention::Offloaded { lsh: None, .. }
    ));
    assert!(toml::from_str::<PolicyConfig>("polcy = \"dense\"").is_err());
    let bad_layer = PolicyConfig {
        dense_layers: Some(vec![9]),
        ..PolicyConfig::default()
    };
    assert!(bad_layer.resolve(&[None; 4]).is_err());
    let tiny = PolicyConfig {
        dense_below: 10,
        ..PolicyConfig::default()
    };
    assert!(tiny.resolve(&[None; 4]).is_err());
    assert!(LayerPolicy::parse("lsh:k=99,l=2").is_err());
    assert!(LayerPolicy::parse("fast").is_err());
}

#[test]
fn key_storage_is_part_of_the_policy() {
    let int8 = LayerPolicy::parse("lsh:k=10,l=150,kbits=8").expect("parses");
    assert!(matches!(
        int8.attention,
        LayerAttention::Offloaded {
            kv_dtype: KvDtype::K8,
            ..
        }
    ));
    let plain = LayerPolicy::parse("topk:k=64").expect("parses");
    assert!(matches!(
        plain.attention,
        LayerAttention::Offloaded {
            kv_dtype: KvDtype::BF16,
            ..
        }
    ));
    let int4 = LayerPolicy::parse("lsh:k=10,l=150,kbits=4,vbits=2").expect("parses");
    assert!(matches!(
        int4.attention,
        LayerAttention::Offloaded {
            kv_dtype: KvDtype {
                keys: Precision::Int4,
                values: Precision::Int2,
                int2_heads: 0,
            },
            ..
        }
    ));
    assert!(LayerPolicy::parse("lsh:k=10,l=150,kbits=3").is_err());
    let both = LayerPolicy::parse("lsh:k=10,l=150,kbits=8,vbits=8").expect("parses");
    assert!(matches!(
        both.attention,
        LayerAttention::Offloaded {
            kv_dtype: KvDtype::K8V8,
            ..
        }
    ));
    assert!(LayerPolicy::parse("lsh:k=10,l=150,vbits=32").is_err());
    assert!(LayerPolicy::parse("lsh:k=10,l=150,kbits=8,vbits=1").is_err());
}

#[test]
fn int2_heads_are_printed_and_checked_against_the_model() {
    let config = PolicyConfig {
        policy: "lsh:k=10,l=75,kbits=4,vbits=4,int2_heads=2".into(),
        ..PolicyConfig::default()
    };
    let table = config.resolve(&[None; 4]).expect("table");
    assert!(
        table.to_string().contains("int2 in the 2 kv heads"),
        "{table}"
    );
    assert!(table.check_kv_heads(2).is_ok());
    let err = table.check_kv_heads(1).unwrap_err().to_string();
    assert!(err.contains("int2_heads=2"), "{err}");
    assert!(PolicyTable::dense(&[None; 4]).check_kv_heads(1).is_ok());
}
