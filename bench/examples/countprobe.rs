use std::time::Instant;
use tandem_kernels::gaps::{count_pairs, Bucket, GapWriter};
use tandem_kernels::rng::SplitMix64;
fn main() {
    let n = 98304usize;
    let mut rng = SplitMix64(3);
    let mut w = GapWriter::with_capacity(0);
    let mut buckets = Vec::new();
    for b in 0..600 {
        let len = 60 + (rng.next_u64() % 100) as usize;
        let mut ids: Vec<u32> = (0..len)
            .map(|_| (rng.next_u64() % n as u64) as u32)
            .collect();
        ids.sort_unstable();
        ids.dedup();
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
    let ids: usize = 600 * 110;
    let mut pairs = vec![0u8; n];
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..100 {
            count_pairs(&packed, &buckets, 0, &mut pairs);
            pairs.iter_mut().for_each(|p| *p = 0);
        }
        let el = t.elapsed().as_secs_f64() / 100.0;
        println!(
            "count {:.1} us per call ({:.2} ns/id approx), packed {} KB",
            el * 1e6,
            el * 1e9 / ids as f64,
            packed.len() / 1024
        );
    }
    let t = Instant::now();
    for _ in 0..100 {
        pairs.iter_mut().for_each(|p| *p = 0);
        std::hint::black_box(&mut pairs);
    }
    println!("zeroing {:.1} us", t.elapsed().as_secs_f64() / 100.0 * 1e6);
}
