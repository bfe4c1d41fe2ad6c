//! One sequence's keys and values on the GPU: per layer, bf16 arrays of rows
//! `n_kv_heads × head_dim`, row-major, with their [`WindowLayout`].

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use tandem_gpu::{AttentionShape, DeviceError};

use super::staging::Pinned;
use crate::error::CudaError;
use crate::layout::{Shift, WindowLayout};

/// One layer's window.
pub(crate) struct LayerKv {
    pub(crate) layout: WindowLayout,
    pub(crate) keys: Option<CudaSlice<u16>>,
    pub(crate) values: Option<CudaSlice<u16>>,
}

/// Keys and values of one sequence, resident on the GPU.
pub struct CudaKv {
    pub(crate) shape: AttentionShape,
    pub(crate) layers: Vec<LayerKv>,
}

impl CudaKv {
    pub(crate) fn new(n_layers: usize, shape: AttentionShape) -> CudaKv {
        let layers = (0..n_layers)
            .map(|_| LayerKv {
                layout: WindowLayout::default(),
                keys: None,
                values: None,
            })
            .collect();
        CudaKv { shape, layers }
    }

    /// Elements of one row.
    pub(crate) fn width(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    pub(crate) fn layer(&self, layer: usize) -> Result<&LayerKv, DeviceError> {
        self.layers
            .get(layer)
            .ok_or_else(|| DeviceError::Shape(format!("layer {layer} of {}", self.layers.len())))
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv, DeviceError> {
        let n = self.layers.len();
        self.layers
            .get_mut(layer)
            .ok_or_else(|| DeviceError::Shape(format!("layer {layer} of {n}")))
    }
}

impl LayerKv {
    /// Makes room for `extra` rows of `width`, copying the held rows when the arrays grow.
    pub(crate) fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        extra: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        let Some(capacity) = self.layout.reserve(extra) else {
            return Ok(());
        };
        let held = self.layout.len() * width;
        for array in [&mut self.keys, &mut self.values] {
            let mut grown = stream.alloc_zeros::<u16>(capacity * width)?;
            if let Some(old) = array.as_ref() {
                if held > 0 {
                    stream.memcpy_dtod(&old.slice(..held), &mut grown.slice_mut(..held))?;
                }
            }
            *array = Some(grown);
        }
        Ok(())
    }

    /// Copies `rows` of both arrays to the host as bf16, through `pinned` on
    /// the copy stream `copies`.
    pub(crate) fn read_rows(
        &self,
        copies: &Arc<CudaStream>,
        pinned: &mut Pinned<u16>,
        rows: Range<usize>,
        width: usize,
        keys: &mut Vec<bf16>,
        values: &mut Vec<bf16>,
    ) -> Result<(), CudaError> {
        let span = rows.start * width..rows.end * width;
        let mut bits = Vec::with_capacity(span.len());
        for (array, dst) in [(&self.keys, keys), (&self.values, values)] {
            let Some(array) = array else { continue };
            if span.is_empty() {
                continue;
            }
            bits.clear();
            pinned.download(copies, &array.slice(span.clone()), &mut bits)?;
            dst.extend(bits.iter().map(|&b| bf16::from_bits(b)));
        }
        Ok(())
    }

    /// Removes rows `start..start + count`, moving the later rows down.
    pub(crate) fn remove(
        &mut self,
        stream: &Arc<CudaStream>,
        start: usize,
        count: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        let shift = self
            .layout
            .remove(start, count)
            .map_err(|e| CudaError::Unavailable(e.to_string()))?;
        if let Some(shift) = shift {
            for array in [&mut self.keys, &mut self.values].into_iter().flatten() {
                move_rows(stream, array, &shift, width)?;
            }
        }
        if let Some(capacity) = self.layout.shrink() {
            let held = self.layout.len() * width;
            for array in [&mut self.keys, &mut self.values].into_iter().flatten() {
                let mut smaller = stream.alloc_zeros::<u16>(capacity * width)?;
                if held > 0 {
                    stream.memcpy_dtod(&array.slice(..held), &mut smaller.slice_mut(..held))?;
                }
                *array = smaller;
            }
        }
        Ok(())
    }
}

/// Moves the rows of `shift` down, through a staging copy when they overlap.
fn move_rows(
    stream: &Arc<CudaStream>,
    array: &mut CudaSlice<u16>,
    shift: &Shift,
    width: usize,
) -> Result<(), CudaError> {
    let n = shift.from.len() * width;
    let (from, to) = (shift.from.start * width, shift.to * width);
    if shift.overlaps() {
        let staged = stream.clone_dtod(&array.slice(from..from + n))?;
        stream.memcpy_dtod(&staged, &mut array.slice_mut(to..to + n))?;
    } else {
        let (mut low, high) = array.split_at_mut(from);
        stream.memcpy_dtod(&high.slice(..n), &mut low.slice_mut(to..to + n))?;
    }
    Ok(())
}
