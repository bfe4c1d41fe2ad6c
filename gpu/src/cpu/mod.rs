//! The dense device on the CPU: runtime-dispatched SIMD kernels on a small pool.
//! Device memory is host memory, so every transfer of the seam is a borrow.

mod attention;
mod kv;
mod matmul;

use std::ops::Range;

use half::bf16;
use tandem_kernels::ops::{
    add_bias_in_place, add_in_place, gelu_tanh_mul_in_place, merge_partials, rms_norm,
    rotate_halves, rotate_interleaved, scale_in_place, silu_mul_in_place,
};
use tandem_kernels::parallel::ThreadPool;
use tandem_kernels::Isa;

pub use kv::CpuKv;

use crate::device::{Activation, DenseDevice, DeviceBuffer, KvLayer, RopeStyle};

use crate::error::DeviceError;

use crate::host::{AttentionShape, HostMatrix};
use crate::shape::{rope_tokens, same_rows, shape_error, PartialSpan};

/// The CPU as dense device.
pub struct CpuDevice {
    pool: ThreadPool,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl CpuDevice {
    /// A device running on `threads` threads (the caller's included).
    pub fn new(threads: usize) -> CpuDevice {
        CpuDevice {
            pool: ThreadPool::new(threads),
        }
    }

    /// Threads the device runs on.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
}

impl DeviceBuffer for Vec<f32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

fn job_failed(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Job(e.to_string())
}

impl DenseDevice for CpuDevice {
    type Matrix = HostMatrix;
    type Buffer = Vec<f32>;
    type Kv = CpuKv;

    fn name(&self) -> String {
        format!("cpu ({}, {} threads)", Isa::detect().name(), self.threads())
    }

    fn upload(&self, matrix: HostMatrix) -> Result<HostMatrix, DeviceError> {
        Ok(matrix)
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Vec<f32>, DeviceError> {
        Ok(values.to_vec())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>, DeviceError> {
        Ok(vec![0.0; len])
    }

    fn to_host<'a>(
        &self,
        buf: &'a Vec<f32>,
        range: Range<usize>,
        _staging: &'a mut Vec<f32>,
    ) -> Result<&'a [f32], DeviceError> {
        let len = buf.len();
        buf.get(range.clone())
            .ok_or_else(|| DeviceError::Shape(format!("read of {range:?} from a buffer of {len}")))
    }

    fn download(&self, buf: Vec<f32>) -> Result<Vec<f32>, DeviceError> {
        Ok(buf)
    }

    fn embed(
        &self,
        table: &HostMatrix,
        tokens: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<(), DeviceError> {
        let (rows, cols) = table.shape();
        if out.len() != tokens.len() * cols {
            return Err(shape_error("embedding", tokens.len() * cols, out.len()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= rows) {
            return Err(DeviceError::Shape(format!(
                "token {t} outside an embedding of {rows} rows"
            )));
        }
        for (row, &t) in out.chunks_exact_mut(cols).zip(tokens) {
            table.row(t as usize, row);
        }
        Ok(())
    }

    fn matmul(&self, w: &HostMatrix, xs: &Vec<f32>, ys: &mut Vec<f32>) -> Result<(), DeviceError> {
        matmul::matmul(&self.pool, w, xs, ys)
    }

    fn rms_norm(
        &self,
        xs: &Vec<f32>,
        weight: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), DeviceError> {
        let width = weight.len();
        same_rows("rms norm", xs.len(), out.len(), width)?;
        for (o, x) in out.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
            rms_norm(x, weight, eps, o);
        }
        Ok(())
    }

    fn rope(
        &self,
        xs: &mut Vec<f32>,
        head_dim: usize,
        angles: &Vec<f32>,
        style: RopeStyle,
    ) -> Result<(), DeviceError> {
        let tokens = rope_tokens(xs.len(), angles.len(), head_dim)?;
        let width = xs.len() / tokens;
        for (row, a) in xs
            .chunks_exact_mut(width)
            .zip(angles.chunks_exact(head_dim))
        {
            for head in row.chunks_exact_mut(head_dim) {
                match style {
                    RopeStyle::Interleaved => rotate_interleaved(head, a),
                    RopeStyle::Halves => rotate_halves(head, a),
                }
            }
        }
        Ok(())
    }

    fn glu(
        &self,
        activation: Activation,
        gate: &mut Vec<f32>,
        up: &Vec<f32>,
    ) -> Result<(), DeviceError> {
        same_rows("gated activation", gate.len(), up.len(), 1)?;
        match activation {
            Activation::Silu => silu_mul_in_place(gate, up),
            Activation::GeluTanh => gelu_tanh_mul_in_place(gate, up),
        }
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<(), DeviceError> {
        scale_in_place(x, s);
        Ok(())
    }

    fn add_bias(&self, xs: &mut Vec<f32>, bias: &Vec<f32>) -> Result<(), DeviceError> {
        same_rows("bias", xs.len(), xs.len(), bias.len())?;
        add_bias_in_place(xs, bias);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<(), DeviceError> {
        same_rows("add", x.len(), y.len(), 1)?;
        add_in_place(x, y);
        Ok(())
    }

    fn kv_new(&self, n_layers: usize, shape: AttentionShape) -> Result<CpuKv, DeviceError> {
        Ok(CpuKv::new(n_layers, shape))
    }

    fn kv_fork(&self, kv: &CpuKv) -> Result<CpuKv, DeviceError> {
        Ok(kv.clone())
    }

    fn kv_len(&self, kv: &CpuKv, layer: usize) -> usize {
        kv.len(layer)
    }

    fn kv_bytes(&self, kv: &CpuKv) -> usize {
        kv.size_bytes()
    }

    fn kv_append(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        rows: Range<usize>,
    ) -> Result<(), DeviceError> {
        let width = kv.shape().n_kv_heads * kv.shape().head_dim;
        let span = rows.start * width..rows.end * width;
        match (k.get(span.clone()), v.get(span)) {
            (Some(k), Some(v)) => kv.append(layer, k, v),
            _ => Err(shape_error(
                "kv append",
                rows.end * width,
                k.len().min(v.len()),
            )),
        }
    }

    fn kv_take(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        start: usize,
        count: usize,
        keys: &mut Vec<bf16>,
        values: &mut Vec<bf16>,
    ) -> Result<(), DeviceError> {
        kv.take_rows(layer, start, count, keys, values)
    }

    fn kv_discard(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        start: usize,
        count: usize,
    ) -> Result<(), DeviceError> {
        kv.discard_rows(layer, start, count)
    }

    fn kv_truncate(&self, kv: &mut CpuKv, len: usize) {
        kv.truncate(len);
    }

    fn attention(
        &self,
        keys: KvLayer<'_, CpuKv>,
        q: &Vec<f32>,
        rows: Range<usize>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<(), DeviceError> {
        let (kv, layer) = (keys.kv, keys.layer);
        let shape = kv.shape();
        let width = shape.n_heads * shape.head_dim;
        let (span, heads) = (
            rows.start * width..rows.end * width,
            rows.start * shape.n_heads..rows.end * shape.n_heads,
        );
        let first = kv
            .len(layer)
            .checked_sub(rows.len())
            .ok_or_else(|| shape_error("attention rows", rows.len(), kv.len(layer)))?;
        match (q.get(span.clone()), out.get_mut(span), lse.get_mut(heads)) {
            (Some(q), Some(out), Some(lse)) => {
                let span = attention::Span {
                    first,
                    window: keys.window,
                };
                let softmax = keys.softmax;
                attention::attention(&self.pool, kv, layer, q, span, softmax, out, lse)
            }
            _ => Err(shape_error("attention", rows.end * width, q.len())),
        }
    }

    fn merge_partials(
        &self,
        out: &mut Vec<f32>,
        lse: &Vec<f32>,
        rows: Range<usize>,
        part_out: &[f32],
        part_lse: &[f32],
    ) -> Result<(), DeviceError> {
        let span = PartialSpan::new(&rows, part_out.len(), part_lse.len())?;
        let d = span.head_dim;
        let (Some(dev_out), Some(dev_lse)) = (out.get_mut(span.outputs()), lse.get(span.lses()))
        else {
            return Err(shape_error("merge", part_out.len(), lse.len()));
        };
        let mut merged = [0f32; MAX_HEAD_DIM];
        let merged = merged.get_mut(..d).ok_or_else(|| {
            DeviceError::Shape(format!("head dimension {d} above {MAX_HEAD_DIM}"))
        })?;
        for (i, (&a, &b)) in dev_lse.iter().zip(part_lse).enumerate() {
            let head = i * d..(i + 1) * d;
            merge_partials(
                &[(&dev_out[head.clone()], a), (&part_out[head.clone()], b)],
                merged,
            );
            dev_out[head].copy_from_slice(merged);
        }
        Ok(())
    }
}

/// Largest head dimension the merge handles without allocating.
const MAX_HEAD_DIM: usize = 1024;

#[cfg(test)]
mod tests {
    use tandem_kernels::ops::Rope;
    use tandem_kernels::rng::SplitMix64;

    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    #[test]
    fn host_reads_are_borrows_of_the_buffer() {
        let device = CpuDevice::new(1);
        let buf = device.upload_vector(&[1.0, 2.0, 3.0]).expect("upload");
        let mut staging = Vec::new();
        let view = device.to_host(&buf, 1..3, &mut staging).expect("read");
        assert_eq!(view, &[2.0, 3.0]);
        assert!(std::ptr::eq(view.as_ptr(), buf[1..].as_ptr()));
        assert!(device.to_host(&buf, 2..4, &mut Vec::new()).is_err());
    }

    #[test]
    fn rope_rotates_each_row_by_its_positions_angles() {
        let device = CpuDevice::new(1);
        let (head_dim, heads, positions) = (6, 3, [0usize, 5, 77]);
        let rope = Rope::new(head_dim, 10000.0);
        let mut angles = Vec::new();
        for &p in &positions {
            rope.push_angles(p, &mut angles);
        }
        let x = random(positions.len() * heads * head_dim, 1);
        let mut rotated = x.clone();
        device
            .rope(&mut rotated, head_dim, &angles, RopeStyle::Interleaved)
            .expect("rope");
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let at = (t * heads + h) * head_dim..(t * heads + h + 1) * head_dim;
                let mut want = x[at.clone()].to_vec();
                rope.rotate_interleaved(&mut want, p);
                assert_eq!(&rotated[at], &want[..], "row {t} head {h}");
            }
        }
        assert!(device
            .rope(&mut rotated, 5, &angles, RopeStyle::Interleaved)
            .is_err());
    }

    #[test]
    fn merge_takes_the_softmax_over_both_parts_per_row_and_head() {
        let device = CpuDevice::new(1);
        let (rows, heads, d) = (3, 2, 5);
        let dev_out = random(rows * heads * d, 2);
        let dev_lse = random(rows * heads, 3);
        let part_out = random(2 * heads * d, 4);
        let mut part_lse = random(2 * heads, 5);
        part_lse[1] = f32::NEG_INFINITY;
        let mut out = dev_out.clone();
        device
            .merge_partials(&mut out, &dev_lse, 1..3, &part_out, &part_lse)
            .expect("merge");
        assert_eq!(
            &out[..heads * d],
            &dev_out[..heads * d],
            "row 0 is untouched"
        );
        for i in 0..2 * heads {
            let dev = (
                &dev_out[(heads + i) * d..(heads + i + 1) * d],
                dev_lse[heads + i],
            );
            let part = (&part_out[i * d..(i + 1) * d], part_lse[i]);
            let mut want = vec![0f32; d];
            merge_partials(&[dev, part], &mut want);
            assert_eq!(&out[(heads + i) * d..(heads + i + 1) * d], &want[..]);
        }
        assert!(device
            .merge_partials(&mut out, &dev_lse, 0..2, &part_out, &part_lse[..3])
            .is_err());
    }

    #[test]
    fn embedding_rows_and_out_of_range_tokens() {
        let device = CpuDevice::new(1);
        let table = HostMatrix::F32 {
            rows: 3,
            cols: 2,
            data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        };
        let mut out = device.zeros(4).expect("zeros");
        device.embed(&table, &[2, 0], &mut out).expect("embed");
        assert_eq!(out, vec![4.0, 5.0, 0.0, 1.0]);
        assert!(device.embed(&table, &[3, 0], &mut out).is_err());
    }
}
