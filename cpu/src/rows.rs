//! The stored K and V rows of one kv head: bf16 or f32 values, int8 codes
//! with one scale per channel, or int4/int2 codes with a range per row
//! ([`KvDtype`]), in blocks that grow without copying.

use crate::channels::ChannelScales;
use crate::config::{KvDtype, Precision};
use crate::error::CpuError;
use crate::packed::{PackedKeys, PackedValues};
use crate::row_blocks::{Blocks, Elem};
use crate::snapshot::{ArrayReader, ArrayWriter};
use half::bf16;
use tandem_kernels::mem::OutOfMemory;
use tandem_kernels::packed::CodeBits;
use tandem_kernels::vector::prefetch;

/// Stored rows of one kv head, `[n][head_dim]`.
pub(crate) enum Rows {
    Bf16(Blocks<bf16>),
    F32(Blocks<f32>),
    I8(CodeRows),
    PackedKeys(PackedKeys),
    PackedValues(PackedValues),
}

/// int8 rows with one scale per channel: `x ≈ offset + scales ⊙ code`.
pub(crate) struct CodeRows {
    pub(crate) codes: Blocks<i8>,
    pub(crate) channels: ChannelScales,
    /// One row being quantized (appends allocate nothing per row).
    row_codes: Vec<i8>,
}

impl CodeRows {
    fn push<T: Elem>(&mut self, row: &[T]) -> Result<(), OutOfMemory> {
        let ChannelScales {
            inverse, offset, ..
        } = &self.channels;
        for (((c, x), o), inv) in self.row_codes.iter_mut().zip(row).zip(offset).zip(inverse) {
            let v = (x.to_f32() - o) * inv;
            // NaN (a non-finite key) becomes 0: `as` saturates and maps NaN to 0.
            *c = v.round().clamp(-127.0, 127.0) as i8;
        }
        self.codes.extend(&self.row_codes, |x| x)
    }
}

impl Rows {
    /// Key rows of a store of `dtype`.
    pub(crate) fn keys(dtype: KvDtype, d: usize) -> Self {
        match dtype.keys {
            Precision::Bf16 => Rows::Bf16(Blocks::new(d)),
            Precision::F32 => Rows::F32(Blocks::new(d)),
            Precision::Int8 => Rows::codes(d),
            Precision::Int4 => Rows::PackedKeys(PackedKeys::new(CodeBits::Four, d)),
            Precision::Int2 => Rows::PackedKeys(PackedKeys::new(CodeBits::Two, d)),
        }
    }

    /// Value rows of a store of `dtype`.
    pub(crate) fn values(dtype: KvDtype, d: usize) -> Self {
        match dtype.values {
            Precision::Bf16 => Rows::Bf16(Blocks::new(d)),
            Precision::F32 => Rows::F32(Blocks::new(d)),
            Precision::Int8 => Rows::codes(d),
            Precision::Int4 => Rows::PackedValues(PackedValues::new(CodeBits::Four, d)),
            Precision::Int2 => Rows::PackedValues(PackedValues::new(CodeBits::Two, d)),
        }
    }

    fn codes(d: usize) -> Self {
        Rows::I8(CodeRows {
            codes: Blocks::new(d),
            channels: ChannelScales::default(),
            row_codes: vec![0; d],
        })
    }

    /// Fixes the centring and scales of quantized keys from the prefill
    /// `rows`, around `mean`; other rows have none.
    pub(crate) fn fix_key_channels<'r, T: Elem + 'r>(
        &mut self,
        d: usize,
        mean: &[f32],
        rows: impl Iterator<Item = &'r [T]>,
    ) {
        match self {
            Rows::I8(c) => c.channels.fix(d, mean, true, rows),
            Rows::PackedKeys(p) => p.fix_channels(mean, rows),
            _ => {}
        }
    }

    /// The per-channel offsets quantized keys add to what their codes give.
    pub(crate) fn key_offset(&self) -> Option<&[f32]> {
        match self {
            Rows::I8(c) => Some(&c.channels.offset),
            Rows::PackedKeys(p) => Some(&p.channels.offset),
            _ => None,
        }
    }

    /// Number of stored rows.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Rows::Bf16(b) => b.rows,
            Rows::F32(b) => b.rows,
            Rows::I8(c) => c.codes.rows,
            Rows::PackedKeys(p) => p.rows.rows,
            Rows::PackedValues(p) => p.rows.rows,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        let per_channel = |c: &ChannelScales| (c.scales.len() + c.offset.len()) * 4;
        match self {
            Rows::Bf16(b) => b.bytes(),
            Rows::F32(b) => b.bytes(),
            Rows::I8(c) => c.codes.bytes() + per_channel(&c.channels),
            Rows::PackedKeys(p) => p.rows.bytes() + per_channel(&p.channels),
            Rows::PackedValues(p) => p.rows.bytes(),
        }
    }

    /// Reserves room for `n` more rows, backed by huge pages where the OS
    /// allows (rows are read in random order).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.reserve(n),
            Rows::F32(b) => b.reserve(n),
            Rows::I8(c) => c.codes.reserve(n),
            Rows::PackedKeys(p) => p.rows.reserve(n),
            Rows::PackedValues(p) => p.rows.reserve(n),
        }
    }

    pub(crate) fn extend<T: Elem>(&mut self, src: &[T]) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.extend(src, Elem::to_bf16),
            Rows::F32(b) => b.extend(src, Elem::to_f32),
            Rows::I8(c) => {
                if !c.channels.is_fixed() {
                    c.channels.fix_unprefilled(c.codes.d, src);
                }
                for r in src.chunks_exact(c.codes.d) {
                    c.push(r)?;
                }
                Ok(())
            }
            Rows::PackedKeys(p) => {
                if !p.channels.is_fixed() {
                    p.fix_channels_unprefilled(src);
                }
                p.push(src)
            }
            Rows::PackedValues(p) => p.push(src),
        }
    }

    /// Writes the rows as stored (codes with their scales, offsets and
    /// ranges).
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        match self {
            Rows::Bf16(b) => b.save(out),
            Rows::F32(b) => b.save(out),
            Rows::I8(c) => {
                c.codes.save(out);
                c.channels.save(out);
            }
            Rows::PackedKeys(p) => p.save(out),
            Rows::PackedValues(p) => p.save(out),
        }
    }

    /// Loads `n` rows written by [`Rows::save`] into these empty rows.
    pub(crate) fn load(&mut self, n: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        match self {
            Rows::Bf16(b) => b.load(n, "bf16 rows", input),
            Rows::F32(b) => b.load(n, "f32 rows", input),
            Rows::I8(c) => {
                c.codes.load(n, "int8 rows", input)?;
                c.channels.load(c.codes.d, n, input)
            }
            Rows::PackedKeys(p) => p.load(n, input),
            Rows::PackedValues(p) => p.load(n, input),
        }
    }

    /// Row `i` widened to f32 into `dst` (`dst.len()` values).
    pub(crate) fn row_f32(&self, i: usize, dst: &mut [f32]) {
        match self {
            Rows::Bf16(b) => {
                for (o, x) in dst.iter_mut().zip(b.row(i)) {
                    *o = x.to_f32();
                }
            }
            Rows::F32(b) => dst.copy_from_slice(b.row(i)),
            Rows::I8(c) => {
                let ChannelScales { scales, offset, .. } = &c.channels;
                let rows = dst.iter_mut().zip(c.codes.row(i)).zip(scales).zip(offset);
                for (((o, &x), s), m) in rows {
                    *o = m + s * f32::from(x);
                }
            }
            Rows::PackedKeys(p) => p.row_f32(i, dst),
            Rows::PackedValues(p) => p.row_f32(i, dst),
        }
    }

    /// Cache lines of one row.
    pub(crate) fn lines_per_row(&self) -> usize {
        let bytes = match self {
            Rows::Bf16(b) => b.d * 2,
            Rows::F32(b) => b.d * 4,
            Rows::I8(c) => c.codes.d,
            Rows::PackedKeys(p) => p.rows.d,
            Rows::PackedValues(p) => p.rows.d,
        };
        bytes.div_ceil(64).max(1)
    }

    /// Prefetches row `i`, if there is one.
    #[inline(always)]
    pub(crate) fn prefetch_row(&self, i: usize) {
        if i < self.rows() {
            match self {
                Rows::Bf16(b) => prefetch(b.row(i)),
                Rows::F32(b) => prefetch(b.row(i)),
                Rows::I8(c) => prefetch(c.codes.row(i)),
                Rows::PackedKeys(p) => prefetch(p.rows.row(i)),
                Rows::PackedValues(p) => prefetch(p.rows.row(i)),
            }
        }
    }
}
