//! Decode speed of the LSH tables' 12-bit gap lists, per instruction set:
//! `cargo run --release -p tandem-bench --example gaps`. Lists of 115 ids with
//! gaps up to 1700, as a bucket of K=10 tables over 96k keys has.

use std::time::Instant;
use tandem_kernels::gaps::{decode_gaps_with, GapWriter};
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::Isa;

fn main() {
    let mut rng = SplitMix64(1);
    let mut writer = GapWriter::with_capacity(600 * 120);
    let mut spans = Vec::new();
    for _ in 0..600 {
        let start = writer.units();
        let (mut prev, mut id) = (0u32, 0u32);
        for _ in 0..115 {
            id += (rng.next_u64() % 1700) as u32;
            writer.push_id(prev, id);
            prev = id;
        }
        spans.push((start, writer.units()));
    }
    let packed = writer.finish();
    let mut out = vec![0u32; 4096];
    for isa in Isa::all_supported() {
        let start = Instant::now();
        let mut ids = 0;
        for _ in 0..1000 {
            for &(s, e) in &spans {
                ids += decode_gaps_with(isa, &packed, s, e, &mut out);
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / ids as f64;
        println!("{:>7}: {ns:.2} ns per id", isa.name());
    }
}
