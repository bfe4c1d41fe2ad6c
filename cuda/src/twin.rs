//! CPU twins of the kernels: the same arithmetic in the same order (block
//! reductions as trees over [`BLOCK`] lanes; the kernels are compiled without
//! contracting multiply-adds), so the kernels' numerics are tested without a GPU.

use half::bf16;

use crate::geometry::{Geometry, BLOCK};

/// `embed`: rows `tokens` of a bf16 table of `cols` columns.
pub fn embed(table: &[bf16], tokens: &[u32], cols: usize, out: &mut [f32]) {
    for (o, &t) in out.chunks_exact_mut(cols).zip(tokens) {
        let row = &table[t as usize * cols..(t as usize + 1) * cols];
        for (o, x) in o.iter_mut().zip(row) {
            *o = x.to_f32();
        }
    }
}

/// The kernels' tree sum: lane `i` holds `lanes[i]`, halved by strides.
fn tree_sum<T: Copy + std::ops::AddAssign>(mut lanes: [T; BLOCK]) -> T {
    let mut s = BLOCK / 2;
    while s > 0 {
        for i in 0..s {
            let x = lanes[i + s];
            lanes[i] += x;
        }
        s /= 2;
    }
    lanes[0]
}

/// `rms_norm` of one row: lane `i` sums the squares of elements `i, i+BLOCK, ...` in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut lanes = [0f64; BLOCK];
    for (i, v) in x.iter().enumerate() {
        lanes[i % BLOCK] += (v * v) as f64;
    }
    let mean_sq = tree_sum(lanes) / x.len() as f64;
    let inv = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// `rope` of every head of every row (rows of `width`), angles per row.
pub fn rope(xs: &mut [f32], width: usize, head_dim: usize, angles: &[f32], halves: bool) {
    let half = head_dim / 2;
    for (row, a) in xs
        .chunks_exact_mut(width)
        .zip(angles.chunks_exact(head_dim))
    {
        for h in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (p, q) = if halves {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x, y, cos, sin) = (h[p], h[q], a[2 * i], a[2 * i + 1]);
                h[p] = x * cos - y * sin;
                h[q] = x * sin + y * cos;
            }
        }
    }
}

/// `silu_mul`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gelu_tanh_mul`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = 0.797_884_6 * (x + 0.044715 * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// `add`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `scale`.
pub fn scale(x: &mut [f32], s: f32) {
    for a in x {
        *a *= s;
    }
}

/// `add_bias`: element `i` gets `bias[i % width]`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for (i, a) in x.iter_mut().enumerate() {
        *a += bias[i % bias.len()];
    }
}

/// `to_bf16`: round to nearest even on the bits, NaNs kept quiet.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter()
        .map(|&v| {
            let u = v.to_bits();
            let bits = if u & 0x7fff_ffff > 0x7f80_0000 {
                (u >> 16) | 0x0040
            } else {
                u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16
            };
            bf16::from_bits(bits as u16)
        })
        .collect()
}

/// One split's running state: max, sum of `exp(score - max)`, un-normalised output.
#[derive(Debug, Clone)]
struct SplitState {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

/// `attend_split` for split `s` of head `h` of query `t`: `keys` and `values`
/// are the window's rows, `n_kv_heads × head_dim` each.
fn attend_split(
    q: &[f32],
    keys: &[bf16],
    values: &[bf16],
    g: &Geometry,
    (s, h, t): (usize, usize, usize),
) -> SplitState {
    let d = g.head_dim as usize;
    let kvh = h / (g.n_heads / g.n_kv_heads) as usize;
    let row = g.n_kv_heads as usize * d;
    let seen = g.rows(t);
    let lo = seen.start + s * g.split as usize;
    let hi = seen.end.min(lo + g.split as usize);
    let qs = &q[(t * g.n_heads as usize + h) * d..][..d];
    let mut st = SplitState {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        acc: vec![0.0; d],
    };
    let mut c = lo;
    while c < hi {
        let n = BLOCK.min(hi - c);
        let mut scores = [f32::NEG_INFINITY; BLOCK];
        for (i, score) in scores.iter_mut().take(n).enumerate() {
            let k = &keys[(c + i) * row + kvh * d..][..d];
            let dot = k
                .iter()
                .zip(qs)
                .fold(0f32, |acc, (k, q)| acc + k.to_f32() * q);
            *score = dot * g.scale;
        }
        let m_new = st
            .max
            .max(scores.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut weights = [0f32; BLOCK];
        for (w, s) in weights.iter_mut().zip(&scores).take(n) {
            *w = (s - m_new).exp();
        }
        let correction = if st.max == f32::NEG_INFINITY {
            0.0
        } else {
            (st.max - m_new).exp()
        };
        st.sum = st.sum * correction + tree_sum(weights);
        for (j, acc) in st.acc.iter_mut().enumerate() {
            let a = (0..n).fold(0f32, |a, i| {
                a + weights[i] * values[(c + i) * row + kvh * d + j].to_f32()
            });
            *acc = *acc * correction + a;
        }
        st.max = m_new;
        c += BLOCK;
    }
    st
}

/// `attend_split` over every split, then `combine`: writes `out` (normalised,
/// `tokens × n_heads × head_dim`) and `lse` (`tokens × n_heads`).
pub fn attention(
    q: &[f32],
    keys: &[bf16],
    values: &[bf16],
    g: &Geometry,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (heads, d) = (g.n_heads as usize, g.head_dim as usize);
    for (pair, l) in lse.iter_mut().enumerate() {
        let (t, h) = (pair / heads, pair % heads);
        let parts: Vec<SplitState> = (0..g.splits as usize)
            .map(|s| attend_split(q, keys, values, g, (s, h, t)))
            .collect();
        let m = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max));
        let total = parts
            .iter()
            .filter(|p| p.sum > 0.0)
            .fold(0f32, |acc, p| acc + p.sum * (p.max - m).exp());
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        for (j, o) in out[pair * d..(pair + 1) * d].iter_mut().enumerate() {
            let x = parts
                .iter()
                .filter(|p| p.sum > 0.0)
                .fold(0f32, |acc, p| acc + p.acc[j] * (p.max - m).exp());
            *o = x * inv;
        }
        *l = if total > 0.0 {
            m + total.ln()
        } else {
            f32::NEG_INFINITY
        };
    }
}

/// `merge`: folds a partial from elsewhere into the device's, per (row, head).
pub fn merge(out: &mut [f32], lse: &[f32], part_out: &[f32], part_lse: &[f32], head_dim: usize) {
    for (pair, (&a, &b)) in lse.iter().zip(part_lse).enumerate() {
        let o = &mut out[pair * head_dim..(pair + 1) * head_dim];
        let p = &part_out[pair * head_dim..(pair + 1) * head_dim];
        let m = a.max(b);
        if m == f32::NEG_INFINITY || m.is_nan() {
            o.fill(0.0);
            continue;
        }
        let (ea, eb) = (((a - m) as f64).exp(), ((b - m) as f64).exp());
        let total = ea + eb;
        let (wa, wb) = ((ea / total) as f32, (eb / total) as f32);
        for (o, p) in o.iter_mut().zip(p) {
            let mut x = 0.0;
            if wa > 0.0 {
                x += wa * *o;
            }
            if wb > 0.0 {
                x += wb * p;
            }
            *o = x;
        }
    }
}
