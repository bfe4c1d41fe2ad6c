//! The CPU device's keys and values of one sequence.

use half::bf16;

use crate::error::DeviceError;

use crate::host::AttentionShape;
use crate::shape::check_rows;

/// Keys and values of one sequence, per layer and key/value head, in bf16.
///
/// Each (layer, kv head) holds its positions contiguously, `len × head_dim`, so an
/// attention pass streams memory in order and a later stage can move a range of old
/// positions to the CPU attention workers by slicing.
#[derive(Debug, Clone)]
pub struct CpuKv {
    shape: AttentionShape,
    n_layers: usize,
    /// `[layer][kv_head]` → `len × head_dim` keys.
    keys: Vec<Vec<Vec<bf16>>>,
    values: Vec<Vec<Vec<bf16>>>,
    lens: Vec<usize>,
}

impl CpuKv {
    /// An empty cache.
    pub fn new(n_layers: usize, shape: AttentionShape) -> CpuKv {
        let per_layer = || {
            (0..shape.n_kv_heads)
                .map(|_| Vec::new())
                .collect::<Vec<_>>()
        };
        CpuKv {
            shape,
            n_layers,
            keys: (0..n_layers).map(|_| per_layer()).collect(),
            values: (0..n_layers).map(|_| per_layer()).collect(),
            lens: vec![0; n_layers],
        }
    }

    /// The attention geometry.
    pub fn shape(&self) -> AttentionShape {
        self.shape
    }

    /// Rows held in `layer` (its positions, unless rows were taken out).
    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    /// Whether layer 0 holds no position.
    pub fn is_empty(&self) -> bool {
        self.lens.first().is_none_or(|&l| l == 0)
    }

    /// Appends `T` positions to `layer`: `k` and `v` are `T × n_kv_heads × head_dim`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), DeviceError> {
        let row = self.shape.n_kv_heads * self.shape.head_dim;
        if layer >= self.n_layers || k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(DeviceError::Shape(format!(
                "append to layer {layer} of {}: {} keys and {} values, rows of {row}",
                self.n_layers,
                k.len(),
                v.len()
            )));
        }
        let d = self.shape.head_dim;
        for (k_tok, v_tok) in k.chunks_exact(row).zip(v.chunks_exact(row)) {
            for h in 0..self.shape.n_kv_heads {
                self.keys[layer][h]
                    .extend(k_tok[h * d..(h + 1) * d].iter().map(|&x| bf16::from_f32(x)));
                self.values[layer][h]
                    .extend(v_tok[h * d..(h + 1) * d].iter().map(|&x| bf16::from_f32(x)));
            }
        }
        self.lens[layer] += k.len() / row;
        Ok(())
    }

    /// Moves `count` rows of `layer`, starting at row `start`, out of the cache,
    /// appending them to `keys` and `values` as `count × n_kv_heads × head_dim`
    /// (the layout [`CpuKv::append`] takes, in bf16). Later rows move down.
    pub fn take_rows(
        &mut self,
        layer: usize,
        start: usize,
        count: usize,
        keys: &mut Vec<bf16>,
        values: &mut Vec<bf16>,
    ) -> Result<(), DeviceError> {
        self.check_rows(layer, start, count)?;
        let d = self.shape.head_dim;
        for r in start..start + count {
            for h in 0..self.shape.n_kv_heads {
                keys.extend_from_slice(&self.keys[layer][h][r * d..(r + 1) * d]);
                values.extend_from_slice(&self.values[layer][h][r * d..(r + 1) * d]);
            }
        }
        self.discard_rows(layer, start, count)
    }

    /// Forgets `count` rows of `layer` from row `start`; later rows move down.
    pub fn discard_rows(
        &mut self,
        layer: usize,
        start: usize,
        count: usize,
    ) -> Result<(), DeviceError> {
        self.check_rows(layer, start, count)?;
        let d = self.shape.head_dim;
        for h in 0..self.shape.n_kv_heads {
            for rows in [&mut self.keys[layer][h], &mut self.values[layer][h]] {
                rows.drain(start * d..(start + count) * d);
                // Give back the memory of a bulk move (not of one evicted row).
                if rows.capacity() > 2 * rows.len() + 4096 {
                    rows.shrink_to_fit();
                }
            }
        }
        self.lens[layer] -= count;
        Ok(())
    }

    fn check_rows(&self, layer: usize, start: usize, count: usize) -> Result<(), DeviceError> {
        let held = self.lens.get(layer).copied().unwrap_or(0);
        if layer >= self.n_layers {
            return Err(DeviceError::Shape(format!(
                "layer {layer} of a cache of {} layers",
                self.n_layers
            )));
        }
        check_rows(layer, start, count, held)
    }

    /// Drops every row from `len` on, in every layer.
    pub fn truncate(&mut self, len: usize) {
        let d = self.shape.head_dim;
        for layer in 0..self.n_layers {
            for h in 0..self.shape.n_kv_heads {
                self.keys[layer][h].truncate(len * d);
                self.values[layer][h].truncate(len * d);
            }
            self.lens[layer] = self.lens[layer].min(len);
        }
    }

    /// Keys of (`layer`, `kv_head`): `len × head_dim`.
    pub fn keys(&self, layer: usize, kv_head: usize) -> &[bf16] {
        &self.keys[layer][kv_head]
    }

    /// Values of (`layer`, `kv_head`): `len × head_dim`.
    pub fn values(&self, layer: usize, kv_head: usize) -> &[bf16] {
        &self.values[layer][kv_head]
    }

    /// Bytes held by keys and values.
    pub fn size_bytes(&self) -> usize {
        self.lens.iter().sum::<usize>() * self.shape.n_kv_heads * self.shape.head_dim * 2 * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_rows_moves_rows_out_in_append_layout() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 3,
        };
        let mut cache = CpuKv::new(2, shape);
        let rows: Vec<f32> = (0..5 * 6).map(|i| i as f32).collect();
        let values: Vec<f32> = rows.iter().map(|x| -x).collect();
        cache.append(1, &rows, &values).expect("append");
        let (mut k, mut v) = (Vec::new(), Vec::new());
        cache.take_rows(1, 1, 2, &mut k, &mut v).expect("take");
        let as_f32 = |x: &[bf16]| x.iter().map(|b| b.to_f32()).collect::<Vec<_>>();
        assert_eq!(as_f32(&k), rows[6..18].to_vec());
        assert_eq!(as_f32(&v), values[6..18].to_vec());
        assert_eq!(cache.len(1), 3);
        assert_eq!(cache.len(0), 0);
        // Row 3 moved down to row 1; kv head 1 of it is elements 21..24.
        assert_eq!(as_f32(&cache.keys(1, 1)[3..6]), rows[21..24].to_vec());
        assert!(cache.take_rows(1, 2, 2, &mut k, &mut v).is_err());
        assert!(cache.take_rows(5, 0, 0, &mut k, &mut v).is_err());
    }
}
