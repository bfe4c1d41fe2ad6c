//! The argument checks every [`crate::DenseDevice`] implementation makes
//! before touching its memory, written once so the devices refuse alike.

use std::ops::Range;

use crate::error::DeviceError;

/// An error naming an operation and the two sizes that do not fit together.
pub fn shape_error(what: &str, a: usize, b: usize) -> DeviceError {
    DeviceError::Shape(format!("{what}: {a} and {b} elements do not fit"))
}

/// Checks that `xs` is whole rows of `width` and `out` as long as `xs`.
pub fn same_rows(what: &str, xs: usize, out: usize, width: usize) -> Result<(), DeviceError> {
    if width == 0 || !xs.is_multiple_of(width) || xs != out {
        return Err(shape_error(what, xs, out));
    }
    Ok(())
}

/// The tokens a rotary embedding covers: `angles` holds `head_dim / 2`
/// (cos, sin) pairs per token, and `xs` whole heads of those tokens.
pub fn rope_tokens(xs: usize, angles: usize, head_dim: usize) -> Result<usize, DeviceError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !angles.is_multiple_of(head_dim) {
        return Err(shape_error("rope angles", angles, head_dim));
    }
    let tokens = angles / head_dim;
    if tokens == 0 || !xs.is_multiple_of(tokens * head_dim) {
        return Err(shape_error("rope", xs, angles));
    }
    Ok(tokens)
}

/// Where a partial from elsewhere lands in the device's partial
/// ([`crate::DenseDevice::merge_partials`]): its (row, head) pairs start at
/// pair `first`, `pairs` of them, each `head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialSpan {
    pub first: usize,
    pub pairs: usize,
    pub head_dim: usize,
}

impl PartialSpan {
    /// The span of `rows` for a partial of `out_len` outputs and `lse_len`
    /// log-sum-exps, or an error when they are not whole rows and heads.
    pub fn new(rows: &Range<usize>, out_len: usize, lse_len: usize) -> Result<Self, DeviceError> {
        let whole = |n: usize, unit: usize| unit > 0 && n.is_multiple_of(unit);
        if !whole(lse_len, rows.len()) || !whole(out_len, lse_len) {
            return Err(shape_error("merge", out_len, lse_len));
        }
        Ok(PartialSpan {
            first: rows.start * (lse_len / rows.len()),
            pairs: lse_len,
            head_dim: out_len / lse_len,
        })
    }

    /// The span's elements in the output.
    pub fn outputs(&self) -> Range<usize> {
        self.first * self.head_dim..(self.first + self.pairs) * self.head_dim
    }

    /// The span's log-sum-exps.
    pub fn lses(&self) -> Range<usize> {
        self.first..self.first + self.pairs
    }
}

/// Checks that rows `start..start + count` lie within the `held` rows of `layer`.
pub fn check_rows(
    layer: usize,
    start: usize,
    count: usize,
    held: usize,
) -> Result<(), DeviceError> {
    if start.checked_add(count).is_none_or(|end| end > held) {
        return Err(DeviceError::Shape(format!(
            "rows {start}..+{count} of layer {layer}, which holds {held}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_span_is_whole_rows_and_heads() {
        let span = PartialSpan::new(&(2..4), 2 * 3 * 8, 2 * 3).expect("fits");
        assert_eq!((span.first, span.pairs, span.head_dim), (6, 6, 8));
        assert_eq!(span.outputs(), 48..96);
        assert_eq!(span.lses(), 6..12);
        assert!(PartialSpan::new(&(2..4), 2 * 3 * 8, 5).is_err());
        assert!(PartialSpan::new(&(2..4), 7, 2).is_err());
        assert!(PartialSpan::new(&(2..2), 0, 0).is_err());
    }

    #[test]
    fn rows_beyond_the_layer_or_overflowing_are_refused() {
        assert!(check_rows(0, 2, 3, 5).is_ok());
        assert!(check_rows(0, 2, 4, 5).is_err());
        assert!(check_rows(0, usize::MAX, 2, 5).is_err());
    }
}
