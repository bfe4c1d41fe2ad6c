//! The window's bookkeeping against the CPU device's window: a host mirror of
//! the GPU arrays, driven by [`WindowLayout`] exactly as the CUDA device
//! drives its device arrays (grow and copy, move rows down through staging,
//! shrink), holds the same rows as the CPU device after every operation.

use half::bf16;
use tandem_cuda::{twin, WindowLayout};
use tandem_gpu::{AttentionShape, CpuDevice, CpuKv, DenseDevice};
use tandem_kernels::rng::SplitMix64;

const SHAPE: AttentionShape = AttentionShape {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 3,
};
const WIDTH: usize = 6;

/// One layer's keys as the CUDA device holds them, in host memory.
#[derive(Default)]
struct Mirror {
    layout: WindowLayout,
    keys: Vec<u16>,
    /// Times the arrays grew, shrank, and rows moved through staging or directly.
    events: [usize; 4],
}

impl Mirror {
    fn append(&mut self, rows: &[f32]) {
        let n = rows.len() / WIDTH;
        if let Some(capacity) = self.layout.reserve(n) {
            let held = self.layout.len() * WIDTH;
            self.events[0] += 1;
            let mut grown = vec![0u16; capacity * WIDTH];
            grown[..held].copy_from_slice(&self.keys[..held]);
            self.keys = grown;
        }
        let at = self.layout.len() * WIDTH;
        for (dst, x) in self.keys[at..at + rows.len()]
            .iter_mut()
            .zip(twin::to_bf16(rows))
        {
            *dst = x.to_bits();
        }
        self.layout.push(n);
    }

    fn take(&mut self, start: usize, count: usize, out: &mut Vec<bf16>) {
        let span = start * WIDTH..(start + count) * WIDTH;
        out.extend(self.keys[span].iter().map(|&b| bf16::from_bits(b)));
        self.remove(start, count);
    }

    fn remove(&mut self, start: usize, count: usize) {
        if let Some(shift) = self.layout.remove(start, count).expect("rows held") {
            let (from, to, n) = (
                shift.from.start * WIDTH,
                shift.to * WIDTH,
                shift.from.len() * WIDTH,
            );
            self.events[2 + usize::from(!shift.overlaps())] += 1;
            if shift.overlaps() {
                let staged = self.keys[from..from + n].to_vec();
                self.keys[to..to + n].copy_from_slice(&staged);
            } else {
                let (low, high) = self.keys.split_at_mut(from);
                low[to..to + n].copy_from_slice(&high[..n]);
            }
        }
        if let Some(capacity) = self.layout.shrink() {
            let held = self.layout.len() * WIDTH;
            self.events[1] += 1;
            let mut smaller = vec![0u16; capacity * WIDTH];
            smaller[..held].copy_from_slice(&self.keys[..held]);
            self.keys = smaller;
        }
    }

    /// Held rows in the CPU device's layout: per kv head, `len × head_dim`.
    fn by_head(&self, head: usize) -> Vec<bf16> {
        let d = SHAPE.head_dim;
        (0..self.layout.len())
            .flat_map(|r| &self.keys[r * WIDTH + head * d..r * WIDTH + (head + 1) * d])
            .map(|&b| bf16::from_bits(b))
            .collect()
    }
}

fn same(mirror: &Mirror, cpu: &CpuKv, what: &str) {
    assert_eq!(mirror.layout.len(), cpu.len(0), "{what}: rows");
    for h in 0..SHAPE.n_kv_heads {
        assert_eq!(mirror.by_head(h), cpu.keys(0, h), "{what}: kv head {h}");
    }
}

#[test]
fn the_window_mirror_holds_what_the_cpu_window_holds() {
    let device = CpuDevice::new(1);
    let mut cpu = device.kv_new(1, SHAPE).expect("kv");
    let mut mirror = Mirror::default();
    let mut rng = SplitMix64(5);
    let mut next = 0f32;
    for step in 0..400 {
        let held = mirror.layout.len();
        let r = rng.next_u64();
        match r % 4 {
            // Appends, from one row (decode) to a bulk prefill.
            0 | 1 => {
                let n = if r.is_multiple_of(16) {
                    700
                } else {
                    1 + (r >> 8) as usize % 5
                };
                let rows: Vec<f32> = (0..n * WIDTH).map(|i| next + i as f32).collect();
                next += rows.len() as f32;
                device
                    .kv_append(&mut cpu, 0, &rows, &rows, 0..n)
                    .expect("append");
                mirror.append(&rows);
            }
            // A bulk take (offload) or one evicted row.
            2 if held > 0 => {
                let start = (r >> 8) as usize % held;
                let count = if r % 8 == 2 { held - start } else { 1 };
                let (mut k, mut v, mut mk) = (Vec::new(), Vec::new(), Vec::new());
                device
                    .kv_take(&mut cpu, 0, start, count, &mut k, &mut v)
                    .expect("take");
                mirror.take(start, count, &mut mk);
                assert_eq!(mk, k, "step {step}: taken rows");
            }
            3 if held > 0 => {
                let count = 1 + (r >> 8) as usize % held.min(3);
                device.kv_discard(&mut cpu, 0, 0, count).expect("discard");
                mirror.remove(0, count);
            }
            _ => {}
        }
        same(&mirror, &cpu, &format!("step {step}"));
    }
    assert!(
        mirror.events.iter().all(|&n| n > 0),
        "grew, shrank, staged and direct moves: {:?}",
        mirror.events
    );
}
