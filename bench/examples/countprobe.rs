//! How fast the retrieval's counting kernel runs with its data in cache:
//! `cargo run --release -p tandem-bench --example countprobe`.
//!
//! Builds 600 gap-coded buckets of 60–160 random ids below 98,304 (one 96k
//! retrieval of 4 query heads at K=10, L=150 decodes ~66,000 ids) and times
//! `tandem_kernels::gaps::count_pairs` over them, counters zeroed between
//! calls. The decode's counting, read cold, is measured against this.

use std::time::Instant;

use tandem_kernels::gaps::{count_pairs, Bucket, GapWriter};
use tandem_kernels::rng::SplitMix64;

fn main() {
    let n = 98_304usize;
    let mut rng = SplitMix64(3);
    let mut w = GapWriter::with_capacity(0);
    let mut buckets = Vec::new();
    let mut total_ids = 0;
    for b in 0..600 {
        let len = 60 + (rng.next_u64() % 100) as usize;
        let mut ids: Vec<u32> = (0..len)
            .map(|_| (rng.next_u64() % n as u64) as u32)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        total_ids += ids.len();
        let start = w.units() as u32;
        let mut prev = 0;
        for &id in &ids {
            w.push_id(prev, id);
            prev = id;
        }
        buckets.push(Bucket {
            start,
            end: w.units() as u32,
            heads: 1 << (b % 4),
        });
    }
    let packed = w.finish();
    let mut pairs = vec![0u8; n];
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..100 {
            count_pairs(&packed, &buckets, 0, &mut pairs);
            pairs.iter_mut().for_each(|p| *p = 0);
        }
        let s = t.elapsed().as_secs_f64() / 100.0;
        println!(
            "{total_ids} ids in {} KB: {:.1} us per call, {:.2} ns per id",
            packed.len() / 1024,
            s * 1e6,
            s * 1e9 / total_ids as f64
        );
    }
}
