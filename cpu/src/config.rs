//! Shape, row type and index parameters of one layer's offloaded store.

use crate::error::CpuError;
use std::ops::RangeInclusive;

/// Bits per table code an index may have.
pub(crate) const LSH_K: RangeInclusive<usize> = 1..=16;
/// Tables an index may have.
pub(crate) const LSH_L: RangeInclusive<usize> = 1..=512;

/// Element type of the stored K and V rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// bf16 rows (2 bytes per value).
    #[default]
    Bf16,
    /// f32 rows (4 bytes per value).
    F32,
    /// Keys as int8 codes with one scale per channel, as KIVI quantizes keys
    /// (`k ≈ mean + scales ⊙ code`, around the head's centring mean), values
    /// bf16: DESIGN's `k8v16`. A key of head dimension 128 is then two cache
    /// lines and nothing else, where a bf16 key is four: sampled attention
    /// reads one key row per retrieved key from memory at random. The scales
    /// are fixed by the first rows stored (the prefill) with a quarter of
    /// headroom; later keys beyond that range are clamped. A store that was
    /// never prefilled fixes them from its first appended rows with 4 times
    /// more room, a coarser grid.
    K8,
    /// Keys as in [`KvDtype::K8`], and values too as int8 codes with one scale
    /// per channel around their mean (`k8v8`): half the bytes of bf16 rows for
    /// both, so a retrieved key and its value are two cache lines each.
    K8V8,
}

impl KvDtype {
    /// Bytes of one stored key and its value, each of dimension `d`.
    pub fn pair_bytes(self, d: usize) -> usize {
        match self {
            KvDtype::Bf16 => 4 * d,
            KvDtype::F32 => 8 * d,
            KvDtype::K8 => 3 * d,
            KvDtype::K8V8 => 2 * d,
        }
    }
}

/// Bytes an offloaded store holds per key of one kv head of dimension `d`:
/// its key and value rows and, with `lsh`, its index (each table's gap-coded
/// bucket entry and raw code, counted at 4 bytes), the key norm and the key
/// sketch. An upper estimate for checking a budget before building a store.
pub fn store_bytes_per_key(dtype: KvDtype, lsh: Option<LshIndexParams>, d: usize) -> usize {
    let index = lsh.map_or(0, |p| {
        4 * p.l + 2 + crate::policy::sketch_rank_for(d) / 2 + 4
    });
    dtype.pair_bytes(d) + index
}

/// The SimHash index of a store: `l` tables of `k`-bit codes, and the
/// collision threshold `t` that both retrieval (a key is retrieved when it
/// collides with the query in at least `t` tables) and the estimator's
/// sampling probabilities use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshIndexParams {
    /// Bits per table code, 1..=16.
    pub k: usize,
    /// Number of tables, 1..=512.
    pub l: usize,
    /// Collision threshold, 1..=min(l, 255).
    pub t: u8,
}

impl LshIndexParams {
    /// Checks the ranges given on each field ([`crate::store::LayerStore::new`]
    /// does).
    pub(crate) fn validate(&self) -> Result<(), CpuError> {
        let LshIndexParams { k, l, t } = *self;
        if !LSH_K.contains(&k) {
            return Err(CpuError::Config(format!("K={k} not in 1..=16")));
        }
        if !LSH_L.contains(&l) {
            return Err(CpuError::Config(format!("L={l} not in 1..=512")));
        }
        if t == 0 || usize::from(t) > l {
            return Err(CpuError::Config(format!("t={t} not in 1..=min(L,255)")));
        }
        Ok(())
    }
}

/// Shape and index parameters of one layer's offloaded store.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Number of kv heads.
    pub n_kv_heads: usize,
    /// Query heads per kv head (GQA group size), 1..=8.
    pub group: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// SimHash index, or `None` for no index (dense/top-k/oracle only).
    pub lsh: Option<LshIndexParams>,
    /// Seed; hyperplanes are derived from (seed, layer, kv head).
    pub seed: u64,
    /// Layer index (part of the hyperplane seed).
    pub layer: u32,
    /// Element type the K and V rows are stored in.
    pub kv_dtype: KvDtype,
    /// Components of the key sketch that finds LSH's safety sets
    /// ([`crate::LshParams::top`]), fitted at the prefill load: 0 keeps none,
    /// else a multiple of 8 below `head_dim`, at most 64.
    pub sketch: usize,
}

impl Default for LayerConfig {
    /// One kv head of dimension 128, no GQA, no index, bf16 rows; fill in the
    /// rest with struct update syntax.
    fn default() -> Self {
        LayerConfig {
            n_kv_heads: 1,
            group: 1,
            head_dim: 128,
            lsh: None,
            seed: 0,
            layer: 0,
            kv_dtype: KvDtype::Bf16,
            sketch: 0,
        }
    }
}

impl LayerConfig {
    /// Checks every field's range.
    pub(crate) fn validate(&self) -> Result<(), CpuError> {
        if self.n_kv_heads == 0 || self.head_dim == 0 {
            return Err(CpuError::Config(
                "n_kv_heads and head_dim must be > 0".into(),
            ));
        }
        if !(1..=8).contains(&self.group) {
            return Err(CpuError::Config(format!(
                "group {} not in 1..=8",
                self.group
            )));
        }
        let r = self.sketch;
        if r > 0 && (r >= self.head_dim || !r.is_multiple_of(8) || r > crate::sketch::MAX_RANK) {
            return Err(CpuError::Config(format!(
                "a key sketch of {r} components for head_dim {}: a multiple of 8, below head_dim, at most {}",
                self.head_dim,
                crate::sketch::MAX_RANK
            )));
        }
        self.lsh.as_ref().map_or(Ok(()), LshIndexParams::validate)
    }
}
