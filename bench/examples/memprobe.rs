//! How fast this machine reads memory the way decode does: `cargo run --release
//! -p tandem-bench --example memprobe -- [--mib 1024] [--row-bytes 256]
//! [--density 0.05] [--threads 2]`.
//!
//! Prints GB/s for a sequential sweep (the weights of a matrix-vector product)
//! and for scattered rows at the given density (the K rows that sampled
//! attention retrieves), for 1 and `--threads` threads and a few prefetch
//! distances. This is the floor the CPU attention side is measured against:
//! bytes touched per token divided by the scattered rate.

use std::time::Instant;

use half::bf16;
use tandem_kernels::mem::HugeBuf;
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::vector::{dot_bf16_f32, prefetch};

fn main() {
    let mut mib = 1024usize;
    let mut row_bytes = 256usize;
    let mut density = 0.05f64;
    let mut threads = 2usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        let ok = match pair[0].as_str() {
            "--mib" => value.parse().map(|v| mib = v).is_ok(),
            "--row-bytes" => value.parse().map(|v| row_bytes = v).is_ok(),
            "--density" => value.parse().map(|v| density = v).is_ok(),
            "--threads" => value.parse().map(|v| threads = v).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("usage: memprobe [--mib N] [--row-bytes N] [--density F] [--threads N]");
            std::process::exit(2);
        }
    }
    let d = (row_bytes / 2).max(32);
    let rows = (mib << 20) / (d * 2);
    // One buffer per thread, so that threads do not share rows.
    let bufs: Vec<HugeBuf<bf16>> = (0..threads.max(1))
        .map(|t| {
            let mut b = HugeBuf::with_capacity(rows * d, true).expect("memory for the probe");
            let mut rng = SplitMix64(t as u64 + 1);
            let src: Vec<f32> = (0..d * 4096).map(|_| rng.signed_f32()).collect();
            while b.spare() > 0 {
                b.extend_map(&src, bf16::from_f32);
            }
            b
        })
        .collect();
    let mut rng = SplitMix64(7);
    let mut ids: Vec<usize> = (0..rows)
        .filter(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= density)
        .collect();
    ids.sort_unstable();
    let q = vec![0.5f32; d];
    println!(
        "# {} MiB per thread, rows of {} bytes, density {density} ({} rows)",
        mib,
        d * 2,
        ids.len()
    );
    for t in [1, threads.max(1)] {
        let sweep = run(&bufs[..t], |b| {
            let mut acc = 0.0f32;
            for row in b.chunks_exact(d) {
                acc += dot_bf16_f32(row, &q);
            }
            (acc, b.len() * 2)
        });
        println!("sequential  threads {t}: {sweep:6.2} GB/s");
        for ahead in [0usize, 4, 8, 16] {
            let rate = run(&bufs[..t], |b| {
                let mut acc = 0.0f32;
                for (j, &i) in ids.iter().enumerate() {
                    if ahead > 0 {
                        if let Some(&next) = ids.get(j + ahead) {
                            prefetch(&b[next * d..(next + 1) * d]);
                        }
                    }
                    acc += dot_bf16_f32(&b[i * d..(i + 1) * d], &q);
                }
                (acc, ids.len() * d * 2)
            });
            println!("scattered   threads {t}: {rate:6.2} GB/s (prefetch {ahead} rows ahead)");
        }
    }
}

/// GB/s of `f` run once on each buffer, one thread per buffer (best of 3).
fn run(bufs: &[HugeBuf<bf16>], f: impl Fn(&[bf16]) -> (f32, usize) + Sync) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let bytes: usize = std::thread::scope(|s| {
            let handles: Vec<_> = bufs.iter().map(|b| s.spawn(|| f(b))).collect();
            handles
                .into_iter()
                .map(|h| {
                    let (acc, bytes) = h.join().expect("probe thread");
                    std::hint::black_box(acc);
                    bytes
                })
                .sum()
        });
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}
