//! [`CudaDevice`]: the dense device on one NVIDIA GPU. Weights live on it as
//! bf16 (cuBLAS products with f32 accumulation), activations as f32, and each
//! sequence's window as bf16 rows; the kernels are NVRTC-compiled at start.

mod kernels;
mod kv;
mod staging;

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{result::gemm_ex, sys as blas, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use tandem_gpu::shape::{check_rows, rope_tokens, same_rows, shape_error, PartialSpan};
use tandem_gpu::{
    Activation, AttentionShape, DenseDevice, DeviceBuffer, DeviceError, HostMatrix, KvLayer,
    RopeStyle,
};

pub use kv::CudaKv;

use crate::error::CudaError;
use crate::geometry::{Geometry, MAX_HEAD_DIM};
use crate::probe::{check_usable, guarded, open_gpu, target_arch, GpuInfo};
use kernels::Kernels;
use staging::Staging;

/// A weight matrix on the GPU: `rows × cols` bf16, row-major.
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: CudaSlice<u16>,
}

/// A buffer of `f32` on the GPU.
pub struct CudaBuffer(CudaSlice<f32>);

impl DeviceBuffer for CudaBuffer {
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// The dense device on the driver's first GPU. Kernels run on one stream;
/// the split step's transfers to and from the host run on a second, through
/// page-locked buffers, so the host waits for each transfer alone.
pub struct CudaDevice {
    info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copies: Arc<CudaStream>,
    staging: Mutex<Staging>,
    blas: CudaBlas,
    kernels: Kernels,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl CudaDevice {
    /// Opens the first GPU and compiles the kernels for it; an error (never a
    /// panic) says why when there is no usable GPU, driver or NVRTC.
    pub fn new() -> Result<CudaDevice, CudaError> {
        let (ctx, info) = open_gpu()?;
        check_usable(&info)?;
        guarded("starting the CUDA device", || {
            let stream = ctx.default_stream();
            // A second stream turns on cudarc's tracking of each buffer's
            // last read and write, which orders the two streams' work.
            let copies = ctx.new_stream()?;
            let blas = CudaBlas::new(stream.clone())?;
            let kernels = Kernels::compile(&ctx, target_arch(info.compute_capability))?;
            Ok(CudaDevice {
                info: info.clone(),
                ctx: ctx.clone(),
                stream,
                copies,
                staging: Mutex::new(Staging::new(&ctx)),
                blas,
                kernels,
            })
        })
    }

    /// The GPU.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.ctx.synchronize()?)
    }

    fn staging(&self) -> Result<MutexGuard<'_, Staging>, CudaError> {
        self.staging
            .lock()
            .map_err(|_| CudaError::Unavailable("a transfer failed before this one".into()))
    }

    fn upload_bf16(&self, values: &[bf16]) -> Result<CudaSlice<u16>, CudaError> {
        let bits: Vec<u16> = values.iter().map(|v| v.to_bits()).collect();
        Ok(self.stream.clone_htod(&bits)?)
    }

    /// `ys = xs · wᵀ` in cuBLAS: bf16 inputs, f32 output and accumulation.
    fn gemm(
        &self,
        w: &CudaMatrix,
        xs: &CudaSlice<f32>,
        ys: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let tokens = xs.len() / w.cols;
        // SAFETY: fully written by `to_bf16` before the product reads it.
        let mut input = unsafe { self.stream.alloc::<u16>(xs.len()) }?;
        self.kernels
            .to_bf16(&self.stream, &xs.slice(..), &mut input.slice_mut(..))?;
        let (alpha, beta) = (1f32, 0f32);
        let (a, _a) = w.data.device_ptr(&self.stream);
        let (b, _b) = input.device_ptr(&self.stream);
        let (c, _c) = ys.device_ptr_mut(&self.stream);
        // SAFETY: column-major, `w` is `cols × rows` (lda = cols), transposed;
        // the input `cols × tokens`; the output `rows × tokens`: the caller
        // checked `xs` and `ys` hold `tokens` rows of `cols` and `rows`.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                tokens as i32,
                w.cols as i32,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                b as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                blas::cudaDataType::CUDA_R_32F,
                w.rows as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}

/// A device failure as the trait reports it.
fn failed(e: impl Into<CudaError>) -> DeviceError {
    e.into().into()
}

impl DenseDevice for CudaDevice {
    type Matrix = CudaMatrix;
    type Buffer = CudaBuffer;
    type Kv = CudaKv;

    fn name(&self) -> String {
        format!("cuda ({})", self.info)
    }

    fn upload(&self, matrix: HostMatrix) -> Result<CudaMatrix, DeviceError> {
        let (rows, cols) = matrix.shape();
        let mut row = vec![0f32; cols];
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            matrix.row(r, &mut row);
            data.extend(row.iter().map(|&x| bf16::from_f32(x)));
        }
        let data = self.upload_bf16(&data).map_err(failed)?;
        Ok(CudaMatrix { rows, cols, data })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<CudaBuffer, DeviceError> {
        Ok(CudaBuffer(self.stream.clone_htod(values).map_err(failed)?))
    }

    fn zeros(&self, len: usize) -> Result<CudaBuffer, DeviceError> {
        Ok(CudaBuffer(self.stream.alloc_zeros(len).map_err(failed)?))
    }

    fn to_host<'a>(
        &self,
        buf: &'a CudaBuffer,
        range: Range<usize>,
        staging: &'a mut Vec<f32>,
    ) -> Result<&'a [f32], DeviceError> {
        let view = buf.0.try_slice(range.clone()).ok_or_else(|| {
            DeviceError::Shape(format!(
                "read of {range:?} from a buffer of {}",
                buf.0.len()
            ))
        })?;
        staging.clear();
        if range.is_empty() {
            return Ok(staging);
        }
        let mut pinned = self.staging().map_err(failed)?;
        pinned
            .activations
            .download(&self.copies, &view, staging)
            .map_err(failed)?;
        Ok(staging)
    }

    fn download(&self, buf: CudaBuffer) -> Result<Vec<f32>, DeviceError> {
        let host = self.stream.clone_dtoh(&buf.0).map_err(failed)?;
        self.stream.synchronize().map_err(failed)?;
        Ok(host)
    }

    fn embed(
        &self,
        table: &CudaMatrix,
        tokens: &[u32],
        out: &mut CudaBuffer,
    ) -> Result<(), DeviceError> {
        if out.len() != tokens.len() * table.cols {
            return Err(shape_error(
                "embedding",
                tokens.len() * table.cols,
                out.len(),
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(DeviceError::Shape(format!(
                "token {t} outside an embedding of {} rows",
                table.rows
            )));
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let ids = self.stream.clone_htod(tokens).map_err(failed)?;
        self.kernels
            .embed(&self.stream, &table.data, &ids, &mut out.0, table.cols)
            .map_err(failed)
    }

    fn matmul(
        &self,
        w: &CudaMatrix,
        xs: &CudaBuffer,
        ys: &mut CudaBuffer,
    ) -> Result<(), DeviceError> {
        let tokens = xs.len() / w.cols.max(1);
        if w.cols == 0 || xs.len() != tokens * w.cols || ys.len() != tokens * w.rows {
            return Err(shape_error("matmul", xs.len(), ys.len()));
        }
        if tokens == 0 {
            return Ok(());
        }
        self.gemm(w, &xs.0, &mut ys.0).map_err(failed)
    }

    fn rms_norm(
        &self,
        xs: &CudaBuffer,
        weight: &CudaBuffer,
        eps: f32,
        out: &mut CudaBuffer,
    ) -> Result<(), DeviceError> {
        same_rows("rms norm", xs.len(), out.len(), weight.len())?;
        if xs.is_empty() {
            return Ok(());
        }
        self.kernels
            .rms_norm(&self.stream, &xs.0, &weight.0, &mut out.0, eps)
            .map_err(failed)
    }

    fn rope(
        &self,
        xs: &mut CudaBuffer,
        head_dim: usize,
        angles: &CudaBuffer,
        style: RopeStyle,
    ) -> Result<(), DeviceError> {
        rope_tokens(xs.len(), angles.len(), head_dim)?;
        let halves = style == RopeStyle::Halves;
        self.kernels
            .rope(&self.stream, &mut xs.0, &angles.0, head_dim, halves)
            .map_err(failed)
    }

    fn glu(
        &self,
        activation: Activation,
        gate: &mut CudaBuffer,
        up: &CudaBuffer,
    ) -> Result<(), DeviceError> {
        same_rows("gated activation", gate.len(), up.len(), 1)?;
        let name = match activation {
            Activation::Silu => "silu_mul",
            Activation::GeluTanh => "gelu_tanh_mul",
        };
        self.kernels
            .binary(&self.stream, name, &mut gate.0, &up.0)
            .map_err(failed)
    }

    fn add(&self, x: &mut CudaBuffer, y: &CudaBuffer) -> Result<(), DeviceError> {
        same_rows("add", x.len(), y.len(), 1)?;
        self.kernels
            .binary(&self.stream, "add", &mut x.0, &y.0)
            .map_err(failed)
    }

    fn scale(&self, x: &mut CudaBuffer, s: f32) -> Result<(), DeviceError> {
        self.kernels
            .scale(&self.stream, &mut x.0, s)
            .map_err(failed)
    }

    fn add_bias(&self, xs: &mut CudaBuffer, bias: &CudaBuffer) -> Result<(), DeviceError> {
        same_rows("bias", xs.len(), xs.len(), bias.len())?;
        self.kernels
            .add_bias(&self.stream, &mut xs.0, &bias.0)
            .map_err(failed)
    }

    fn kv_new(&self, n_layers: usize, shape: AttentionShape) -> Result<CudaKv, DeviceError> {
        if shape.head_dim > MAX_HEAD_DIM
            || shape.n_kv_heads == 0
            || !shape.n_heads.is_multiple_of(shape.n_kv_heads)
        {
            return Err(DeviceError::Shape(format!(
                "attention of {} heads over {} kv heads of {} (at most {MAX_HEAD_DIM})",
                shape.n_heads, shape.n_kv_heads, shape.head_dim
            )));
        }
        Ok(CudaKv::new(n_layers, shape))
    }

    fn kv_fork(&self, kv: &CudaKv) -> Result<CudaKv, DeviceError> {
        let mut copy = CudaKv::new(kv.layers.len(), kv.shape);
        for (dst, src) in copy.layers.iter_mut().zip(&kv.layers) {
            dst.layout = src.layout;
            dst.keys = src
                .keys
                .as_ref()
                .map(|a| self.stream.clone_dtod(a))
                .transpose()
                .map_err(failed)?;
            dst.values = src
                .values
                .as_ref()
                .map(|a| self.stream.clone_dtod(a))
                .transpose()
                .map_err(failed)?;
        }
        Ok(copy)
    }

    fn kv_len(&self, kv: &CudaKv, layer: usize) -> usize {
        kv.layers.get(layer).map_or(0, |l| l.layout.len())
    }

    fn kv_bytes(&self, kv: &CudaKv) -> usize {
        kv.layers.iter().map(|l| l.layout.len()).sum::<usize>() * kv.width() * 2 * 2
    }

    fn kv_append(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        k: &CudaBuffer,
        v: &CudaBuffer,
        rows: Range<usize>,
    ) -> Result<(), DeviceError> {
        let width = kv.width();
        let span = rows.start * width..rows.end * width;
        let (Some(k), Some(v)) = (k.0.try_slice(span.clone()), v.0.try_slice(span.clone())) else {
            return Err(shape_error("kv append", span.end, k.len().min(v.len())));
        };
        let l = kv.layer_mut(layer)?;
        l.reserve(&self.stream, rows.len(), width).map_err(failed)?;
        let at = l.layout.len() * width..(l.layout.len() + rows.len()) * width;
        for (src, dst) in [(&k, &mut l.keys), (&v, &mut l.values)] {
            if let Some(dst) = dst.as_mut() {
                self.kernels
                    .to_bf16(&self.stream, src, &mut dst.slice_mut(at.clone()))
                    .map_err(failed)?;
            }
        }
        l.layout.push(rows.len());
        Ok(())
    }

    fn kv_take(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        start: usize,
        count: usize,
        keys: &mut Vec<bf16>,
        values: &mut Vec<bf16>,
    ) -> Result<(), DeviceError> {
        let width = kv.width();
        let l = kv.layer_mut(layer)?;
        check_rows(layer, start, count, l.layout.len())?;
        let mut pinned = self.staging().map_err(failed)?;
        l.read_rows(
            &self.copies,
            &mut pinned.rows,
            start..start + count,
            width,
            keys,
            values,
        )
        .map_err(failed)?;
        l.remove(&self.stream, start, count, width).map_err(failed)
    }

    fn kv_discard(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        start: usize,
        count: usize,
    ) -> Result<(), DeviceError> {
        let width = kv.width();
        let l = kv.layer_mut(layer)?;
        check_rows(layer, start, count, l.layout.len())?;
        l.remove(&self.stream, start, count, width).map_err(failed)
    }

    fn kv_truncate(&self, kv: &mut CudaKv, len: usize) {
        for l in &mut kv.layers {
            l.layout.truncate(len);
        }
    }

    fn attention(
        &self,
        keys: KvLayer<'_, CudaKv>,
        q: &CudaBuffer,
        rows: Range<usize>,
        out: &mut CudaBuffer,
        lse: &mut CudaBuffer,
    ) -> Result<(), DeviceError> {
        let kv = keys.kv;
        let shape = kv.shape;
        let l = kv.layer(keys.layer)?;
        let held = l.layout.len();
        let width = shape.n_heads * shape.head_dim;
        let first = held
            .checked_sub(rows.len())
            .ok_or_else(|| shape_error("attention rows", rows.len(), held))?;
        if keys.window == Some(0) {
            return Err(DeviceError::Shape("a sliding window of 0 rows".into()));
        }
        let span = rows.start * width..rows.end * width;
        let heads = rows.start * shape.n_heads..rows.end * shape.n_heads;
        let (Some(qv), Some(mut ov), Some(mut lv)) = (
            q.0.try_slice(span.clone()),
            out.0.try_slice_mut(span),
            lse.0.try_slice_mut(heads),
        ) else {
            return Err(shape_error("attention", rows.end * width, q.len()));
        };
        let (Some(k), Some(v)) = (&l.keys, &l.values) else {
            // Nothing appended yet: only an empty call is valid.
            return match rows.is_empty() {
                true => Ok(()),
                false => Err(shape_error("attention rows", rows.len(), 0)),
            };
        };
        let window_rows = held * kv.width();
        let g = Geometry::new(shape, first, rows.len(), keys.window);
        self.kernels
            .attention(
                &self.stream,
                &qv,
                &k.slice(..window_rows),
                &v.slice(..window_rows),
                g,
                &mut ov,
                &mut lv,
            )
            .map_err(failed)
    }

    fn merge_partials(
        &self,
        out: &mut CudaBuffer,
        lse: &CudaBuffer,
        rows: Range<usize>,
        part_out: &[f32],
        part_lse: &[f32],
    ) -> Result<(), DeviceError> {
        let span = PartialSpan::new(&rows, part_out.len(), part_lse.len())?;
        let (Some(mut dev_out), Some(dev_lse)) = (
            out.0.try_slice_mut(span.outputs()),
            lse.0.try_slice(span.lses()),
        ) else {
            return Err(shape_error("merge", part_out.len(), lse.len()));
        };
        let mut pinned = self.staging().map_err(failed)?;
        let pinned = &mut *pinned;
        let n_out = pinned
            .outputs
            .upload(&self.copies, part_out, &mut pinned.device_outputs)
            .map_err(failed)?;
        let n_lse = pinned
            .lses
            .upload(&self.copies, part_lse, &mut pinned.device_lses)
            .map_err(failed)?;
        let (Some(outs), Some(lses)) = (&pinned.device_outputs, &pinned.device_lses) else {
            return Err(DeviceError::Shape("partials were not staged".into()));
        };
        self.kernels
            .merge(
                &self.stream,
                &mut dev_out,
                &dev_lse,
                &outs.slice(..n_out),
                &lses.slice(..n_lse),
            )
            .map_err(failed)
    }
}
