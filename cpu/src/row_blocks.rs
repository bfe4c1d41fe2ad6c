//! Rows of a fixed number of plain values in blocks that grow without
//! copying, and the element types rows are loaded and appended from.

use crate::error::CpuError;
use crate::snapshot::{ArrayReader, ArrayWriter, LeElem};
use half::bf16;
use tandem_kernels::mem::{HugeBuf, OutOfMemory, Plain, HUGE_PAGE};

/// Bytes per block of stored rows: two huge pages.
const BLOCK_BYTES: usize = 2 * HUGE_PAGE;

/// Rows of `d` values in fixed blocks of a power-of-two number of rows, so
/// that the store grows by adding a block and never copies what it holds.
pub(crate) struct Blocks<T: Plain> {
    blocks: Vec<HugeBuf<T>>,
    pub(crate) d: usize,
    shift: u32,
    pub(crate) rows: usize,
}

impl<T: Plain> Blocks<T> {
    pub(crate) fn new(d: usize) -> Self {
        let fit = (BLOCK_BYTES / (d.max(1) * std::mem::size_of::<T>())).max(1);
        // The largest power of two that fits (a row index splits by shift and mask).
        let shift = usize::BITS - 1 - fit.leading_zeros();
        Blocks {
            blocks: Vec::new(),
            d,
            shift,
            rows: 0,
        }
    }

    pub(crate) fn rows_per_block(&self) -> usize {
        1 << self.shift
    }

    /// Row `i`; panics if `i` is out of range.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize) -> &[T] {
        let block = &self.blocks[i >> self.shift];
        let o = (i & (self.rows_per_block() - 1)) * self.d;
        &block[o..o + self.d]
    }

    /// Rows `first..` as one slice of whole rows: at most `max` of them, as
    /// many as lie in `first`'s block.
    pub(crate) fn run(&self, first: usize, max: usize) -> &[T] {
        let within = first & (self.rows_per_block() - 1);
        let count = max
            .min(self.rows_per_block() - within)
            .min(self.rows.saturating_sub(first));
        let block = &self.blocks[first >> self.shift];
        &block[within * self.d..(within + count) * self.d]
    }

    pub(crate) fn bytes(&self) -> usize {
        self.rows * self.d * std::mem::size_of::<T>()
    }

    /// Allocates blocks for `n` more rows, advised for huge pages at once:
    /// they are about to be filled.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        let want = self.rows + n;
        while self.blocks.len() * self.rows_per_block() < want {
            self.blocks.push(HugeBuf::with_capacity(
                self.rows_per_block() * self.d,
                true,
            )?);
        }
        Ok(())
    }

    /// Appends whole rows (`src.len()` a multiple of `d`), converting each value.
    pub(crate) fn extend<S: Copy>(
        &mut self,
        src: &[S],
        f: impl Fn(S) -> T,
    ) -> Result<(), OutOfMemory> {
        let mut rest = src;
        while !rest.is_empty() {
            // Every block before the one holding row `rows` is full.
            let index = self.rows >> self.shift;
            if index == self.blocks.len() {
                // A block filled by decode appends, a few rows per step, is
                // advised once it has a huge page's worth (below): advising it
                // now would fault a whole huge page for its first row.
                let cap = self.rows_per_block() * self.d;
                self.blocks.push(HugeBuf::with_capacity(cap, false)?);
            }
            let block = &mut self.blocks[index];
            let before = block.len();
            let taken = block.extend_map(rest, &f);
            let size = std::mem::size_of::<T>();
            if before * size < HUGE_PAGE && block.len() * size >= HUGE_PAGE {
                block.advise();
            }
            self.rows += taken / self.d;
            rest = &rest[taken..];
        }
        Ok(())
    }
}

impl<T: Plain + LeElem> Blocks<T> {
    /// Writes the rows as one array, `[rows][d]`.
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        let values = (0..self.rows).flat_map(|i| self.row(i).iter().copied());
        out.put_iter(self.rows * self.d, values);
    }

    /// Appends the `n` rows of the next array (written by [`Blocks::save`]).
    pub(crate) fn load(
        &mut self,
        n: usize,
        what: &str,
        input: &mut ArrayReader,
    ) -> Result<(), CpuError> {
        let flat: Vec<T> = input.get(what, n.saturating_mul(self.d))?;
        self.reserve(n)?;
        self.extend(&flat, |x| x)?;
        Ok(())
    }
}

/// An input element type for loads and appends (bf16 or f32).
pub(crate) trait Elem: Copy + Send + Sync {
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounding to bf16 (exact for bf16).
    fn to_bf16(self) -> bf16;
}

impl Elem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        self
    }
}

impl Elem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_every_row_across_block_boundaries() {
        let d = 1000; // 1024 rows of 4000 bytes per block
        let mut b = Blocks::<f32>::new(d);
        assert_eq!(b.rows_per_block(), 1024);
        let value = |row: usize, j: usize| (row * 7 + j) as f32;
        let rows: Vec<f32> = (0..1500)
            .flat_map(|r| (0..d).map(move |j| value(r, j)))
            .collect();
        b.reserve(1500).expect("reserve");
        b.extend(&rows, |x| x).expect("load");
        // Decode-style appends in odd-sized chunks across the next boundary.
        let more: Vec<f32> = (1500..2600)
            .flat_map(|r| (0..d).map(move |j| value(r, j)))
            .collect();
        for chunk in more.chunks(7 * d) {
            b.extend(chunk, |x| x).expect("append");
        }
        assert_eq!(b.rows, 2600);
        assert_eq!(b.blocks.len(), 3);
        for r in [0, 1, 1023, 1024, 1499, 1500, 2047, 2048, 2599] {
            assert!(
                b.row(r).iter().enumerate().all(|(j, &x)| x == value(r, j)),
                "row {r}"
            );
        }
        assert_eq!(b.bytes(), 2600 * d * 4);
    }

    #[test]
    fn tiny_rows_get_one_block() {
        let mut b = Blocks::<bf16>::new(4);
        b.reserve(3).expect("reserve");
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect();
        b.extend(&src, bf16::from_f32).expect("extend");
        assert_eq!(b.blocks.len(), 1);
        assert_eq!(b.row(2)[3].to_f32(), 11.0);
    }
}
