//! A store's state as a list of little-endian arrays, and back: what a saved
//! session holds so that resuming it needs no prefill.
//!
//! The writer appends arrays in a fixed order; the reader takes them in the
//! same order, each checked against the length its owner expects (from the
//! configuration and the counts read before it) before anything is
//! allocated, so a damaged list is an error, never a panic.

use half::{bf16, f16};

use crate::error::CpuError;

/// An element type arrays are written in, little-endian.
pub trait LeElem: Copy + sealed::Sealed {
    /// Bytes per element.
    const BYTES: usize;
    /// Appends the element's bytes.
    fn write(self, out: &mut Vec<u8>);
    /// The element of `bytes` (`BYTES` long).
    fn read(bytes: &[u8]) -> Self;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! le_elem {
    ($($t:ty => $n:expr, $to:expr, $from:expr;)*) => {$(
        impl sealed::Sealed for $t {}
        impl LeElem for $t {
            const BYTES: usize = $n;
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&$to(self));
            }
            fn read(bytes: &[u8]) -> Self {
                let mut word = [0u8; $n];
                word.copy_from_slice(bytes);
                $from(word)
            }
        }
    )*};
}

le_elem! {
    u8 => 1, u8::to_le_bytes, u8::from_le_bytes;
    i8 => 1, i8::to_le_bytes, i8::from_le_bytes;
    u16 => 2, u16::to_le_bytes, u16::from_le_bytes;
    u32 => 4, u32::to_le_bytes, u32::from_le_bytes;
    u64 => 8, u64::to_le_bytes, u64::from_le_bytes;
    f32 => 4, f32::to_le_bytes, f32::from_le_bytes;
    bf16 => 2, bf16::to_le_bytes, bf16::from_le_bytes;
    f16 => 2, f16::to_le_bytes, f16::from_le_bytes;
}

/// Arrays being written, in order.
#[derive(Debug, Default)]
pub struct ArrayWriter {
    arrays: Vec<Vec<u8>>,
}

impl ArrayWriter {
    /// No arrays yet.
    pub fn new() -> ArrayWriter {
        ArrayWriter::default()
    }

    /// Appends one array.
    pub fn put<T: LeElem>(&mut self, values: &[T]) {
        self.put_iter(values.len(), values.iter().copied());
    }

    /// Appends one array of the `len` values of `values`.
    pub(crate) fn put_iter<T: LeElem>(&mut self, len: usize, values: impl Iterator<Item = T>) {
        let mut bytes = Vec::with_capacity(len * T::BYTES);
        values.for_each(|v| v.write(&mut bytes));
        self.arrays.push(bytes);
    }

    /// The arrays written, each its elements' bytes.
    pub fn into_arrays(self) -> Vec<Vec<u8>> {
        self.arrays
    }
}

/// Arrays being read back, in the order they were written.
#[derive(Debug)]
pub struct ArrayReader<'a> {
    arrays: &'a [&'a [u8]],
    next: usize,
}

impl<'a> ArrayReader<'a> {
    /// Reads `arrays`, each the bytes of one written array.
    pub fn new(arrays: &'a [&'a [u8]]) -> ArrayReader<'a> {
        ArrayReader { arrays, next: 0 }
    }

    /// Arrays not read yet.
    pub fn remaining(&self) -> usize {
        self.arrays.len() - self.next
    }

    /// The next array, which must hold `len` elements (`what` names it in the error).
    pub fn get<T: LeElem>(&mut self, what: &str, len: usize) -> Result<Vec<T>, CpuError> {
        self.get_where(what, |n| n == len, &format!("{len}"))
    }

    /// The next array, of any length up to `max` elements.
    pub fn get_at_most<T: LeElem>(&mut self, what: &str, max: usize) -> Result<Vec<T>, CpuError> {
        self.get_where(what, |n| n <= max, &format!("at most {max}"))
    }

    fn get_where<T: LeElem>(
        &mut self,
        what: &str,
        fits: impl Fn(usize) -> bool,
        expected: &str,
    ) -> Result<Vec<T>, CpuError> {
        let bytes = self
            .arrays
            .get(self.next)
            .ok_or_else(|| CpuError::Snapshot(format!("{what}: missing")))?;
        let n = bytes.len() / T::BYTES;
        if bytes.len() % T::BYTES != 0 || !fits(n) {
            return Err(CpuError::Snapshot(format!(
                "{what}: {} bytes, expected {expected} elements of {} bytes",
                bytes.len(),
                T::BYTES
            )));
        }
        self.next += 1;
        Ok(bytes.chunks_exact(T::BYTES).map(T::read).collect())
    }
}

/// A count read from a saved array, as a `usize` no larger than `max`.
pub(crate) fn count(what: &str, value: u64, max: usize) -> Result<usize, CpuError> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v <= max)
        .ok_or_else(|| CpuError::Snapshot(format!("{what} is {value}, at most {max} fits")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_read_back_as_written_and_wrong_lengths_are_refused() {
        let mut w = ArrayWriter::new();
        w.put(&[1.5f32, -2.0]);
        w.put(&[bf16::from_f32(3.0)]);
        w.put::<i8>(&[-7, 7, 0]);
        let arrays = w.into_arrays();
        let slices: Vec<&[u8]> = arrays.iter().map(Vec::as_slice).collect();
        let mut r = ArrayReader::new(&slices);
        assert_eq!(r.get::<f32>("a", 2).expect("a"), [1.5, -2.0]);
        assert!(r.get::<bf16>("b", 2).is_err());
        assert_eq!(r.get_at_most::<bf16>("b", 4).expect("b")[0].to_f32(), 3.0);
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.get::<i8>("c", 3).expect("c"), [-7, 7, 0]);
        assert!(r.get::<u8>("d", 0).is_err());
    }
}
