//! Stores against their saved copies, the int2 heads' choice and rows, and
//! keys hashed alone or with queries.

use super::*;
use crate::config::LshIndexParams;
use tandem_kernels::hash::table_code;
use tandem_kernels::rng::SplitMix64;

/// A store of `dtype` with an index and a sketch, prefilled with 300 keys
/// and then given `appended` more one at a time.
fn store_with(dtype: crate::KvDtype, appended: usize) -> LayerStore {
    let (d, nh) = (32, 2);
    let cfg = LayerConfig {
        n_kv_heads: nh,
        group: 2,
        head_dim: d,
        lsh: Some(LshIndexParams { k: 4, l: 6, t: 2 }),
        seed: 3,
        kv_dtype: dtype,
        sketch: 8,
        ..LayerConfig::default()
    };
    let mut rng = SplitMix64(11);
    let mut rows = |n: usize| -> Vec<f32> {
        (0..n * nh * d)
            .map(|_| rng.next_u64() as i32 as f32 / 1e9)
            .collect()
    };
    let mut store = LayerStore::new(cfg).expect("config");
    let prefill = rows(300);
    store
        .load_prefill_f32(&prefill, &prefill, 2)
        .expect("prefill");
    for _ in 0..appended {
        let row = rows(1);
        store.append_f32(&row, &row).expect("append");
    }
    store
}

fn saved(store: &LayerStore) -> Vec<Vec<u8>> {
    let mut out = ArrayWriter::new();
    store.save(&mut out).expect("save");
    out.into_arrays()
}

#[test]
fn a_loaded_store_is_the_saved_one() {
    use crate::{KvDtype, Precision::*};
    for (dtype, appended) in [
        (KvDtype::BF16, 700),
        (KvDtype::F32, 20),
        (KvDtype::K8V8, 600),
        (KvDtype::new(Int4, Int4), 600),
        (KvDtype::new(Int2, Int8), 30),
        (KvDtype::new(Bf16, Int2), 30),
        (KvDtype::new(Int4, Int4).with_int2_heads(1), 40),
    ] {
        let store = store_with(dtype, appended);
        let arrays = saved(&store);
        let slices: Vec<&[u8]> = arrays.iter().map(Vec::as_slice).collect();
        let mut input = ArrayReader::new(&slices);
        let loaded = LayerStore::load(store.config().clone(), 1000, &mut input).expect("load");
        assert_eq!(input.remaining(), 0);
        assert_eq!(saved(&loaded), arrays, "{dtype:?}");
        for h in 0..2 {
            let (a, b) = (store.head(h).expect("head"), loaded.head(h).expect("head"));
            let (ia, ib) = (
                a.index.as_ref().expect("index"),
                b.index.as_ref().expect("index"),
            );
            assert_eq!(ia.bytes(), ib.bytes());
            assert_eq!(ia.levels().count(), ib.levels().count());
            let (mut bx, mut by) = (Vec::new(), Vec::new());
            for (x, y) in ia.levels().zip(ib.levels()) {
                assert_eq!((x.base, x.n), (y.base, y.n));
                for (t, c) in (0..6).flat_map(|t| (0..16).map(move |c| (t, c))) {
                    let ((u, e), (v, f)) = (x.bucket(t, c), y.bucket(t, c));
                    assert_eq!((u, e), (v, f));
                    assert_eq!(x.decode_units(u, e, &mut bx), y.decode_units(v, f, &mut by));
                }
            }
        }

        let mut short = ArrayReader::new(&slices[..slices.len() - 1]);
        assert!(LayerStore::load(store.config().clone(), 1000, &mut short).is_err());
        let mut few = ArrayReader::new(&slices);
        assert!(LayerStore::load(store.config().clone(), 100, &mut few).is_err());
    }
}

#[test]
fn the_int2_heads_are_those_of_least_key_spread_and_hold_their_rows_at_int2() {
    use crate::{KvDtype, Precision::Int4};
    let (d, nh) = (32, 3);
    // Head 1's keys spread least, then head 2's.
    let widths = [1.0f32, 0.1, 0.5];
    let mut rng = SplitMix64(4);
    let mut rows = |n: usize| -> Vec<f32> {
        (0..n * nh * d)
            .map(|i| widths[i / d % nh] * rng.normal() as f32)
            .collect()
    };
    let (prefill, appended) = (rows(200), rows(70));
    let filled = |kv_dtype: KvDtype| {
        let cfg = LayerConfig {
            n_kv_heads: nh,
            head_dim: d,
            kv_dtype,
            ..LayerConfig::default()
        };
        let mut store = LayerStore::new(cfg).expect("config");
        store
            .load_prefill_f32(&prefill, &prefill, 2)
            .expect("prefill");
        store.append_f32(&appended, &appended).expect("append");
        store
    };
    let int4 = KvDtype::new(Int4, Int4);
    let mixed = filled(int4.with_int2_heads(2));
    assert_eq!(mixed.int2_heads(), 0b110);
    let (all4, all2) = (filled(int4), filled(KvDtype::INT2));
    assert_eq!((all4.int2_heads(), all2.int2_heads()), (0, 0));
    for h in 0..nh {
        let want = if h == 0 { &all4 } else { &all2 };
        let got = mixed.stored_rows(h).expect("rows");
        assert_eq!(got, want.stored_rows(h).expect("rows"), "head {h}");
    }
    let bytes = |s: &LayerStore| s.kv_bytes();
    assert!(bytes(&all2) < bytes(&mixed) && bytes(&mixed) < bytes(&all4));
    // More int2 heads than kv heads is refused.
    let cfg = LayerConfig {
        n_kv_heads: nh,
        head_dim: d,
        kv_dtype: int4.with_int2_heads(4),
        ..LayerConfig::default()
    };
    assert!(LayerStore::new(cfg).is_err());
}

#[test]
fn keys_hashed_with_queries_get_the_codes_they_get_alone() {
    let (d, l) = (16, 20);
    let cfg = LayerConfig {
        n_kv_heads: 1,
        group: 3,
        head_dim: d,
        lsh: Some(LshIndexParams { k: 6, l, t: 2 }),
        seed: 5,
        ..LayerConfig::default()
    };
    let mut rng = SplitMix64(8);
    let mut rows = |n: usize| -> Vec<bf16> {
        (0..n * d)
            .map(|_| bf16::from_f32(rng.next_u64() as i32 as f32 / 2e9))
            .collect()
    };
    let (prefill, keys, values) = (rows(50), rows(2), rows(2));
    let queries: Vec<f32> = rows(3).iter().map(|x| x.to_f32()).collect();
    let stores: Vec<LayerStore> = (0..2)
        .map(|_| {
            let mut st = LayerStore::new(cfg.clone()).expect("config");
            st.load_prefill(&prefill, &prefill, 1).expect("prefill");
            st
        })
        .collect();
    let (mut alone, mut with) = (
        stores[0].head(0).expect("head"),
        stores[1].head(0).expect("head"),
    );
    alone.append(&keys, &values).expect("append");
    let mut bits = Vec::new();
    with.append_hashing(&keys, &values, &queries, &mut bits)
        .expect("append");
    let (ia, iw) = (
        alone.index.as_ref().expect("index"),
        with.index.as_ref().expect("index"),
    );
    assert_eq!(ia.raw_codes.len(), 2 * l);
    assert_eq!(ia.raw_codes, iw.raw_codes);
    // And each key's codes are those of the key hashed alone.
    let w = iw.projector.words_per_vector();
    for (j, key) in keys.chunks_exact(d).enumerate() {
        let mut x: Vec<f32> = key
            .iter()
            .zip(&with.mean)
            .map(|(k, m)| k.to_f32() - m)
            .collect();
        iw.flip(&mut x);
        let mut b = vec![0u64; w];
        iw.projector.sign_bits(&x, &mut b);
        let codes: Vec<u16> = (0..l).map(|t| table_code(&b, t, 6)).collect();
        assert_eq!(&iw.raw_codes[j * l..(j + 1) * l], &codes[..], "key {j}");
    }
    // The queries' bits are those of the queries hashed alone.
    let mut flipped = queries.clone();
    iw.flip(&mut flipped);
    let mut want = vec![0u64; 3 * iw.projector.words_per_vector()];
    iw.projector.sign_bits(&flipped, &mut want);
    assert_eq!(bits, want);
}
