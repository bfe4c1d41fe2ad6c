//! int4 and int2 rows against scalar references: round trips, the integer
//! dot products of pass 1, the weighted sums of pass 2, appends.

use super::*;
use crate::reads::{packed_axpy, packed_key_dots, KeyQueries};
use crate::rotation::Rotation;
use crate::rows::Rows;
use tandem_kernels::rng::SplitMix64;

const BITS: [CodeBits; 2] = [CodeBits::Two, CodeBits::Four];

/// `n` rows of `d` values in [-1, 1), with channels 3 and `d - 2` (outliers)
/// 20 times larger and shifted.
fn rows_with_outliers(rng: &mut SplitMix64, n: usize, d: usize) -> Vec<f32> {
    let mut rows: Vec<f32> = (0..n * d).map(|_| rng.signed_f32()).collect();
    for r in rows.chunks_exact_mut(d) {
        r[3] = 20.0 * r[3] + 5.0;
        r[d - 2] = 20.0 * r[d - 2] - 7.0;
    }
    rows
}

/// The mean of each channel.
fn mean(rows: &[f32], d: usize) -> Vec<f32> {
    let n = (rows.len() / d) as f32;
    (0..d)
        .map(|c| rows.chunks_exact(d).map(|r| r[c]).sum::<f32>() / n)
        .collect()
}

/// Keys fixed around their mean and loaded, as a prefill does.
fn keys_of(bits: CodeBits, rows: &[f32], d: usize) -> PackedKeys {
    let mut keys = PackedKeys::new(bits, d);
    keys.fix_channels(&mean(rows, d), rows.chunks_exact(d));
    keys.push(rows).expect("push");
    keys
}

/// Codes of `xs` on the grid `lo + step · code`, both rounded to f16 first;
/// returns the dequantized values.
fn on_grid(bits: CodeBits, xs: &[f32], lo: f32, step: f32) -> Vec<f32> {
    let (lo, step) = (f16::from_f32(lo).to_f32(), f16::from_f32(step).to_f32());
    let max = f32::from(bits.max_code());
    xs.iter()
        .map(|x| {
            let code = if step > 0.0 {
                ((x - lo) / step).round().clamp(0.0, max)
            } else {
                0.0
            };
            lo + step * code
        })
        .collect()
}

/// The scalar reference of a row's quantization over its own range.
fn reference_round_trip(bits: CodeBits, xs: &[f32]) -> Vec<f32> {
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lo16 = f16::from_f32(lo).to_f32();
    on_grid(
        bits,
        xs,
        lo,
        (hi - lo16).max(0.0) / f32::from(bits.max_code()),
    )
}

/// The scalar reference of a rotated row's (or group's) quantization: int2
/// codes centred on the mean at 0.9957 standard deviations apart where that
/// is finer than the range's step, else over the range.
fn reference_rotated(bits: CodeBits, rotated: bool, xs: &[f32]) -> Vec<f32> {
    if bits == CodeBits::Four || !rotated {
        return reference_round_trip(bits, xs);
    }
    let n = xs.len() as f32;
    let mean = xs.iter().sum::<f32>() / n;
    let sd = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let levels = f32::from(bits.max_code());
    let clipped = 0.9957 * sd;
    if clipped >= (hi - f16::from_f32(lo).to_f32()).max(0.0) / levels {
        return reference_round_trip(bits, xs);
    }
    on_grid(bits, xs, mean - clipped * levels / 2.0, clipped)
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

#[test]
fn keys_round_trip_as_the_reference_of_their_rotated_row() {
    let mut rng = SplitMix64(5);
    for bits in BITS {
        for d in [64, 80, 128, 7] {
            let rows = rows_with_outliers(&mut rng, 50, d);
            let keys = keys_of(bits, &rows, d);
            let (ch, rotation) = (&keys.channels, Rotation::new(d));
            let mut held = vec![0.0; d];
            let (mut err, mut ranged_err) = (0.0, 0.0);
            for (i, row) in rows.chunks_exact(d).enumerate() {
                keys.row_f32(i, &mut held);
                let mut u: Vec<f32> = (0..d)
                    .map(|c| (row[c] - ch.offset[c]) * ch.inverse[c])
                    .collect();
                rotation.apply(&mut u);
                let mut want = reference_rotated(bits, !rotation.is_identity(), &u);
                let ranged = reference_round_trip(bits, &u);
                err += squared_distance(&want, &u);
                ranged_err += squared_distance(&ranged, &u);
                let step = keys.range(i).1;
                // Within half a step of each rotated value, unless clipped.
                let clipped = (0..d).any(|c| (want[c] - u[c]).abs() > 0.5 * step * 1.01);
                assert!(!clipped || bits == CodeBits::Two, "{bits:?} d={d}");
                rotation.invert(&mut want);
                for c in 0..d {
                    let expect = ch.offset[c] + ch.scales[c] * want[c];
                    assert!(
                        (held[c] - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                        "{bits:?} d={d} row {i} c {c}: {} vs {expect}",
                        held[c]
                    );
                }
            }
            if bits == CodeBits::Two && !rotation.is_identity() {
                assert!(err < 0.75 * ranged_err, "d={d}: {err} vs {ranged_err}");
            } else {
                assert_eq!(err, ranged_err, "{bits:?} d={d}");
            }
        }
    }
}

#[test]
fn rotated_int4_keys_share_one_scale_and_round_aligned_logits_finer() {
    let mut rng = SplitMix64(9);
    let d = 64;
    let rows = rows_with_outliers(&mut rng, 200, d);
    let shared = keys_of(CodeBits::Four, &rows, d);
    assert!(shared
        .channels
        .scales
        .iter()
        .all(|&s| s == shared.channels.scales[0]));
    for (bits, d) in [(CodeBits::Two, 64), (CodeBits::Four, 80)] {
        let rows = rows_with_outliers(&mut rng, 20, d);
        let keys = keys_of(bits, &rows, d);
        assert!(keys.channels.scales[3] > 10.0 * keys.channels.scales[0]);
    }
    // A scale per channel, as int8 and int2 keys keep.
    let mut per_channel = PackedKeys::new(CodeBits::Four, d);
    per_channel
        .channels
        .fix(d, &mean(&rows, d), true, rows.chunks_exact(d));
    per_channel.push(&rows).expect("push");
    // Queries large where the keys are, as RoPE models' are.
    let (mut err_shared, mut err_per_channel) = (0.0, 0.0);
    let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
    for _ in 0..20 {
        let mut q: Vec<f32> = (0..d).map(|_| rng.signed_f32()).collect();
        q[3] *= 10.0;
        q[d - 2] *= 10.0;
        for (i, row) in rows.chunks_exact(d).enumerate() {
            shared.row_f32(i, &mut a);
            per_channel.row_f32(i, &mut b);
            let dot = |k: &[f32]| k.iter().zip(&q).map(|(x, y)| f64::from(x * y)).sum::<f64>();
            err_shared += (dot(&a) - dot(row)).powi(2);
            err_per_channel += (dot(&b) - dot(row)).powi(2);
        }
    }
    assert!(
        err_shared < 0.5 * err_per_channel,
        "{err_shared} vs {err_per_channel}"
    );
}

#[test]
fn values_round_trip_as_the_reference_per_group() {
    let mut rng = SplitMix64(6);
    for bits in BITS {
        for d in [64, 80, 128, 7] {
            let rows = rows_with_outliers(&mut rng, 40, d);
            let mut values = PackedValues::new(bits, d);
            values.push(&rows).expect("push");
            let mut held = vec![0.0; d];
            for (i, row) in rows.chunks_exact(d).enumerate() {
                values.row_f32(i, &mut held);
                let want: Vec<f32> = row
                    .chunks(values.group())
                    .flat_map(|g| reference_round_trip(bits, g))
                    .collect();
                for c in 0..d {
                    assert!(
                        (held[c] - want[c]).abs() <= 1e-5 * (1.0 + want[c].abs()),
                        "{bits:?} d={d}"
                    );
                }
            }
        }
    }
}

#[test]
fn integer_dot_products_equal_the_f64_dot_of_the_codes_with_the_int8_query() {
    let mut rng = SplitMix64(7);
    for bits in BITS {
        for (d, g) in [(64, 3), (80, 8), (128, 1), (7, 2)] {
            let rows = rows_with_outliers(&mut rng, 30, d);
            let keys = Rows::PackedKeys(keys_of(bits, &rows, d));
            let Rows::PackedKeys(p) = &keys else {
                unreachable!()
            };
            let queries: Vec<f32> = (0..g * d).map(|_| rng.signed_f32() * 2.0).collect();
            let kq = KeyQueries::new(&keys, &queries, d);
            let w = kq.ints.len() / g;
            let mut dots = vec![0.0f32; g];
            let mut held = vec![0.0f32; d];
            for i in 0..30 {
                packed_key_dots(p, i, &kq, &mut dots);
                keys.row_f32(i, &mut held);
                let (lo, step) = p.range(i);
                for h in 0..g {
                    let ints = &kq.ints[h * w..(h + 1) * w];
                    let s_q = f64::from(kq.int_scales[h]);
                    // The int8 query against the dequantized codes, in f64.
                    let int_dot: i64 = (0..d)
                        .map(|c| i64::from(ints[c]) * i64::from(code_at(bits, p.codes(i), c)))
                        .sum();
                    let int_sum: i64 = ints[..d].iter().map(|&x| i64::from(x)).sum();
                    let q = &queries[h * d..(h + 1) * d];
                    let offset: f64 = (0..d)
                        .map(|c| f64::from(q[c]) * f64::from(p.channels.offset[c]))
                        .sum();
                    let want = offset
                        + f64::from(lo) * s_q * int_sum as f64
                        + f64::from(step) * s_q * int_dot as f64;
                    let terms: f64 = (0..d)
                        .map(|c| (f64::from(q[c]) * f64::from(held[c])).abs())
                        .sum();
                    assert!(
                        (f64::from(dots[h]) - want).abs() <= 1e-5 * (1.0 + terms),
                        "{bits:?} d={d} h={h}"
                    );
                    // Against the float dot of the dequantized key: within the
                    // query quantization's bound.
                    let float: f64 = (0..d).map(|c| f64::from(q[c]) * f64::from(held[c])).sum();
                    let slack = f64::from(kq.int_slack[h]) + 1e-5 * (1.0 + terms);
                    assert!(
                        (f64::from(dots[h]) - float).abs() <= slack,
                        "{bits:?} d={d} h={h}: {} vs {float}",
                        dots[h]
                    );
                }
            }
        }
    }
}

#[test]
fn weighted_sums_of_values_equal_the_scalar_sum_of_dequantized_rows() {
    let mut rng = SplitMix64(8);
    for bits in BITS {
        for d in [64, 80, 128, 7] {
            let rows = rows_with_outliers(&mut rng, 20, d);
            let mut values = PackedValues::new(bits, d);
            values.push(&rows).expect("push");
            let weights: Vec<f32> = (0..20).map(|_| rng.next_f32()).collect();
            let mut out = vec![0.0f32; d];
            let mut want = vec![0.0f64; d];
            let mut held = vec![0.0f32; d];
            for (i, &w) in weights.iter().enumerate() {
                packed_axpy(&values, i, &mut out, w);
                values.row_f32(i, &mut held);
                for c in 0..d {
                    want[c] += f64::from(w) * f64::from(held[c]);
                }
            }
            for c in 0..d {
                assert!(
                    (f64::from(out[c]) - want[c]).abs() <= 1e-4 * (1.0 + want[c].abs()),
                    "{bits:?} d={d}"
                );
            }
        }
    }
}

#[test]
fn appends_across_block_boundaries_keep_every_row_once() {
    // Rows of 12 bytes (8 of int2 codes, one group's range): a block holds
    // 2^18 of them.
    let d = 32;
    let mut values = PackedValues::new(CodeBits::Two, d);
    assert_eq!(values.rows.rows_per_block(), 1 << 18);
    // Row t holds lo_t + step_t · code, exact in f16 and hit exactly by its
    // codes (both ends present), so it round-trips exactly.
    let row = |t: usize| -> Vec<f32> {
        let (lo, step) = ((t % 1000) as f32 - 500.0, 1.0 + (t % 7) as f32);
        (0..d).map(|c| lo + step * ((c + t) % 4) as f32).collect()
    };
    let n = 300_000;
    let mut t = 0;
    while t < n {
        let m = (1 + t % 5).min(n - t);
        let chunk: Vec<f32> = (t..t + m).flat_map(row).collect();
        values.push(&chunk).expect("append");
        t += m;
    }
    assert_eq!(values.rows.rows, n);
    let mut held = vec![0.0f32; d];
    for t in 0..n {
        values.row_f32(t, &mut held);
        assert_eq!(held, row(t), "row {t}");
    }
}

#[test]
fn a_row_takes_the_bytes_its_dtype_reports() {
    use crate::config::{KvDtype, Precision::*};
    let mut rng = SplitMix64(9);
    for (keys, values) in [(Int4, Int4), (Int2, Int2), (Int4, Int2), (Int2, Int4)] {
        let dtype = KvDtype::new(keys, values);
        for d in [64, 80, 128, 7] {
            let rows = rows_with_outliers(&mut rng, 10, d);
            let mut k = Rows::keys(dtype, d);
            let mut v = Rows::values(dtype, d);
            k.extend(&rows).expect("keys");
            v.extend(&rows).expect("values");
            // The keys' channel scales and offsets are per head, not per row.
            assert_eq!(
                k.bytes() - 8 * d,
                10 * dtype.key_bytes(d),
                "{dtype:?} d={d}"
            );
            assert_eq!(v.bytes(), 10 * dtype.value_bytes(d), "{dtype:?} d={d}");
        }
    }
    let pair = |k, v| KvDtype::new(k, v).pair_bytes(128);
    assert_eq!(
        [
            pair(Bf16, Bf16),
            pair(Int8, Int8),
            pair(Int4, Int4),
            pair(Int4, Int2),
            pair(Int2, Int2)
        ],
        [512, 256, 148, 116, 84]
    );
    assert_eq!(KvDtype::F32.pair_bytes(128), 1024);
}
