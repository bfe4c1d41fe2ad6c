//! Turning GGUF tensors into device matrices and host vectors.
//!
//! Quantized types are repacked into the kernels' affine form `w = d·q + m` per
//! block of 32 (see `tandem_kernels::quant`):
//!
//! - Q4_0, Q4_1 (4-bit codes), Q5_0, Q5_1 and Q8_0 (8-bit codes) exactly: every
//!   weight is the value ggml and gguf-py dequantize it to (only a zero may lose its
//!   sign); Q5's 5-bit codes 0..=31 take a byte each, and the zero points 8, 16 and
//!   128 of Q4_0, Q5_0 and Q8_0 become the offset `m = -z·d`, exact in f16;
//! - Q4_K (4-bit codes) and Q5_K (8-bit codes) with exact codes and each block's
//!   scale `d·sc` and minimum `dmin·m` rounded to f16 (a relative change below 1e-3
//!   of a block's scale);
//! - Q6_K requantized to 8 bits per block of 32 (its 6-bit codes with two 16-weight
//!   scales do not fit one block scale exactly; the change is below half an 8-bit
//!   step).
//!
//! A block whose scale or offset is not finite in f16 (a NaN or infinite scale in the
//! file, or a scale too large for f16 once multiplied out) is an error, as is tensor
//! data of the wrong length. F32 and F16 stay exact in f32; BF16 stays bf16.
//! [`dequantize`] is gguf-py's `dequantize`, bit for bit.

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
                match zero_point(dtype) {
                    // `d·(q - z)` as ggml writes it: the same value as `d·q - z·d`
                    // (both exact in f32), down to the sign of a zero.
                    Some(z) => {
                        for (j, &q) in codes.iter().enumerate() {
                            out.push(scales[j / BLOCK] * (q as f32 - z));
                        }
                    }
                    None => {
                        for (j, &q) in codes.iter().enumerate() {
                            out.push(scales[j / BLOCK] * q as f32 + offsets[j / BLOCK]);
                        }
                    }
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

/// The code that means zero in the symmetric formats (`w = d·(q - z)`).
fn zero_point(dtype: GgmlType) -> Option<f32> {
    match dtype {
        GgmlType::Q4_0 => Some(8.0),
        GgmlType::Q5_0 => Some(16.0),
        GgmlType::Q8_0 => Some(128.0),
        _ => None,
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K or Q5_K block,
/// from the 12 bytes that pack them.
fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// The 32 codes (0..=31) of a Q5_0 or Q5_1 block: weight `i` has its low four bits
/// in byte `i % 16` of `qs` (low nibble for `i < 16`, high nibble after) and its
/// fifth bit in bit `i` of the little-endian `qh`.
fn q5_codes(qh: &[u8], qs: &[u8]) -> Vec<u8> {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    (0..32)
        .map(|i| {
            let low = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
            low | ((((qh >> i) & 1) as u8) << 4)
        })
        .collect()
}

/// One ggml block as affine codes with f32 scales and offsets per 32 weights:
/// exact for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K; Q6_K is requantized to
/// 8 bits.
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
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0).to_f32();
            (q5_codes(&b[2..6], &b[6..22]), vec![d], vec![-16.0 * d])
        }
        GgmlType::Q5_1 => {
            let d = f16_at(b, 0).to_f32();
            let m = f16_at(b, 2).to_f32();
            (q5_codes(&b[4..8], &b[8..24]), vec![d], vec![m])
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0).to_f32();
            let codes = b[2..34]
                .iter()
                .map(|&q| (q as i8 as i16 + 128) as u8)
                .collect();
            (codes, vec![d], vec![-128.0 * d])
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let d = f16_at(b, 0).to_f32();
            let dmin = f16_at(b, 2).to_f32();
            let sc = &b[4..16];
            // Q5_K: the fifth bit of weight `l` of sub-block `j` is bit `j` of qh[l].
            let (qh, qs) = if dtype == GgmlType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            let high = |j: usize, l: usize| qh.map_or(0, |qh| ((qh[l] >> j) & 1) << 4);
            let mut codes = Vec::with_capacity(256);
            let mut scales = Vec::with_capacity(8);
            let mut offsets = Vec::with_capacity(8);
            for chunk in 0..4 {
                let q = &qs[chunk * 32..(chunk + 1) * 32];
                let (j1, j2) = (2 * chunk, 2 * chunk + 1);
                let (s1, m1) = k_scale_min(sc, j1);
                let (s2, m2) = k_scale_min(sc, j2);
                codes.extend(q.iter().enumerate().map(|(l, &x)| (x & 15) | high(j1, l)));
                codes.extend(q.iter().enumerate().map(|(l, &x)| (x >> 4) | high(j2, l)));
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
///
/// Errors (never panics) on data of the wrong length for the shape and type, on a
/// row length that is not a whole number of blocks, and on a quantized block whose
/// scale or offset is not finite once in f16.
pub fn host_matrix(info: &TensorInfo, bytes: &[u8]) -> Result<HostMatrix, String> {
    if info.dims.len() != 2 {
        return Err(format!(
            "expected a matrix, found {} dimensions {:?}",
            info.dims.len(),
            info.dims
        ));
    }
    let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
    let dtype = info.dtype;
    let (block, block_bytes) = dtype
        .block_layout()
        .ok_or_else(|| format!("tensor type {} is not supported", dtype.name()))?;
    if !cols.is_multiple_of(block) {
        return Err(format!(
            "row length {cols} is not a multiple of the {} block size {block}",
            dtype.name()
        ));
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| format!("{rows}x{cols} is too large"))?;
    let want_bytes = n / block * block_bytes;
    if bytes.len() != want_bytes {
        return Err(format!(
            "{} data of {rows}x{cols} needs {want_bytes} bytes, found {} (truncated or corrupt)",
            dtype.name(),
            bytes.len()
        ));
    }
    match dtype {
        GgmlType::F32 | GgmlType::F16 => Ok(HostMatrix::F32 {
            rows,
            cols,
            data: dequantize(dtype, bytes)?,
        }),
        GgmlType::BF16 => Ok(HostMatrix::Bf16 {
            rows,
            cols,
            data: bf16_from_le(bytes),
        }),
        GgmlType::Other(_) => unreachable!("block_layout refused it above"),
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K => {
            let mut codes = Vec::with_capacity(n);
            let mut scales = Vec::with_capacity(n / BLOCK);
            let mut offsets = Vec::with_capacity(n / BLOCK);
            // Codes up to 15 pack two to a byte; Q5's 0..=31 and the rest take a byte.
            let bits = match dtype {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 4,
                _ => 8,
            };
            for b in bytes.chunks_exact(block_bytes) {
                let (c, s, o) = affine_blocks(dtype, b);
                codes.extend(c);
                scales.extend(s.into_iter().map(f16::from_f32));
                offsets.extend(o.into_iter().map(f16::from_f32));
            }
            debug_assert_eq!(codes.len(), n, "{block} per block");
            if let Some(i) = scales
                .iter()
                .zip(&offsets)
                .position(|(d, m)| !d.is_finite() || !m.is_finite())
            {
                let per_row = cols / BLOCK;
                return Err(format!(
                    "{} block of weights {}..{} of row {} has scale {} and offset {}: \
                     not finite in f16 (a NaN or infinite scale, or a corrupt block)",
                    dtype.name(),
                    i % per_row * BLOCK,
                    (i % per_row + 1) * BLOCK,
                    i / per_row,
                    scales[i],
                    offsets[i]
                ));
            }
            AffineMatrix::from_codes(rows, cols, bits, &codes, &scales, &offsets)
                .map(HostMatrix::Affine)
                .map_err(|e| e.to_string())
        }
    }
}
