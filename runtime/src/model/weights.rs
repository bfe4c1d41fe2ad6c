//! Turning GGUF tensors into device matrices and host vectors.
//!
//! Quantized types are repacked into the kernels' affine form `w = d·q + m` per
//! block of 32 (see `tandem_kernels::quant`): Q4_0, Q4_1 and Q8_0 exactly; Q4_K with
//! its per-block scale and minimum rounded to f16 (a relative change below 1e-3 of a
//! block's scale); Q6_K requantized to 8 bits per block of 32 (its 6-bit codes with
//! two 16-weight scales do not fit one block scale exactly; the change is below half
//! an 8-bit step). F32 and F16 stay exact in f32; BF16 stays bf16.

use half::{bf16, f16};
use tandem_gpu::HostMatrix;
use tandem_kernels::quant::{AffineMatrix, BLOCK};

use super::gguf::{GgmlType, TensorInfo};

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Little-endian bf16 bytes as values.
pub(crate) fn bf16_from_le(bytes: &[u8]) -> Vec<bf16> {
    bytes
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Dequantizes raw tensor bytes of `dtype` into floats (the reference semantics).
pub fn dequantize(dtype: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let (block, block_bytes) = dtype
        .block_layout()
        .ok_or_else(|| format!("tensor type {} is not supported", dtype.name()))?;
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(format!(
            "{} bytes are not whole {} blocks",
            bytes.len(),
            dtype.name()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * block);
    for b in bytes.chunks_exact(block_bytes) {
        match dtype {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16_at(b, 0).to_f32()),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            GgmlType::Q6K => out.extend(q6k_values(b)),
            _ => {
                let (codes, scales, offsets) = affine_blocks(dtype, b);
                for (j, &q) in codes.iter().enumerate() {
                    out.push(scales[j / BLOCK] * q as f32 + offsets[j / BLOCK]);
                }
            }
        }
    }
    Ok(out)
}

/// The 256 values of one Q6_K block.
fn q6k_values(b: &[u8]) -> Vec<f32> {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208).to_f32();
    let mut values = vec![0f32; 256];
    for n in 0..2 {
        let (ql, qh, sc, y) = (
            &ql[n * 64..],
            &qh[n * 32..],
            &sc[n * 8..],
            &mut values[n * 128..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
    values
}

/// One ggml block as affine codes with f32 scales and offsets per 32 weights:
/// exact for Q4_0, Q4_1, Q8_0 and Q4_K; Q6_K is requantized to 8 bits.
fn affine_blocks(dtype: GgmlType, b: &[u8]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    match dtype {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let d = f16_at(b, 0).to_f32();
            let (m, qs) = if dtype == GgmlType::Q4_0 {
                (-8.0 * d, &b[2..18])
            } else {
                (f16_at(b, 2).to_f32(), &b[4..20])
            };
            let mut codes = vec![0u8; 32];
            for i in 0..16 {
                codes[i] = qs[i] & 15;
                codes[16 + i] = qs[i] >> 4;
            }
            (codes, vec![d], vec![m])
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0).to_f32();
            let codes = b[2..34]
                .iter()
                .map(|&q| (q as i8 as i16 + 128) as u8)
                .collect();
            (codes, vec![d], vec![-128.0 * d])
        }
        GgmlType::Q4K => {
            let d = f16_at(b, 0).to_f32();
            let dmin = f16_at(b, 2).to_f32();
            let sc = &b[4..16];
            let qs = &b[16..144];
            let scale_min = |j: usize| -> (u8, u8) {
                if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                }
            };
            let mut codes = Vec::with_capacity(256);
            let mut scales = Vec::with_capacity(8);
            let mut offsets = Vec::with_capacity(8);
            for chunk in 0..4 {
                let q = &qs[chunk * 32..(chunk + 1) * 32];
                let (s1, m1) = scale_min(2 * chunk);
                let (s2, m2) = scale_min(2 * chunk + 1);
                codes.extend(q.iter().map(|&x| x & 15));
                codes.extend(q.iter().map(|&x| x >> 4));
                scales.extend([d * s1 as f32, d * s2 as f32]);
                offsets.extend([-dmin * m1 as f32, -dmin * m2 as f32]);
            }
            (codes, scales, offsets)
        }
        GgmlType::Q6K => requantize_8bit(&q6k_values(b)),
        _ => unreachable!("affine_blocks is only called for quantized types"),
    }
}

/// Asymmetric 8-bit quantization per block of 32: `m = min`, `d = (max - min)/255`.
fn requantize_8bit(values: &[f32]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::new();
    let mut offsets = Vec::new();
    for block in values.chunks_exact(BLOCK) {
        let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
        let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        // Scales are stored in f16: round them first so codes are chosen against
        // the scale the kernel will use.
        let d = f16::from_f32((max - min) / 255.0).to_f32();
        let m = f16::from_f32(min).to_f32();
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        codes.extend(
            block
                .iter()
                .map(|&x| ((x - m) * inv).round().clamp(0.0, 255.0) as u8),
        );
        scales.push(d);
        offsets.push(m);
    }
    (codes, scales, offsets)
}

/// A 2-D weight tensor as a host matrix of `rows × cols` (ggml dims `[cols, rows]`).
pub fn host_matrix(info: &TensorInfo, bytes: &[u8]) -> Result<HostMatrix, String> {
    if info.dims.len() != 2 {
        return Err(format!(
            "expected a matrix, found {} dimensions {:?}",
            info.dims.len(),
            info.dims
        ));
    }
    let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
    match info.dtype {
        GgmlType::F32 | GgmlType::F16 => Ok(HostMatrix::F32 {
            rows,
            cols,
            data: dequantize(info.dtype, bytes)?,
        }),
        GgmlType::BF16 => Ok(HostMatrix::Bf16 {
            rows,
            cols,
            data: bf16_from_le(bytes),
        }),
        GgmlType::Other(_) => Err(format!(
            "tensor type {} is not supported",
            info.dtype.name()
        )),
        dtype => {
            let (block, block_bytes) = dtype.block_layout().ok_or("unsupported type")?;
            let n = rows * cols;
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / BLOCK);
            let mut offsets = Vec::with_capacity(n / BLOCK);
            let bits = if matches!(dtype, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K) {
                4
            } else {
                8
            };
            for b in bytes.chunks_exact(block_bytes) {
                let (c, s, o) = affine_blocks(dtype, b);
                codes.extend(c);
                scales.extend(s.into_iter().map(f16::from_f32));
                offsets.extend(o.into_iter().map(f16::from_f32));
            }
            debug_assert_eq!(codes.len(), n, "{block} per block");
            AffineMatrix::from_codes(rows, cols, bits, &codes, &scales, &offsets)
                .map(HostMatrix::Affine)
                .map_err(|e| e.to_string())
        }
    }
}
