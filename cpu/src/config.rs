//! Shape, row type and index parameters of one layer's offloaded store.

use crate::error::CpuError;
use std::ops::RangeInclusive;
use tandem_kernels::packed::{packed_len, CodeBits};

/// Bits per table code an index may have.
pub(crate) const LSH_K: RangeInclusive<usize> = 1..=16;
/// Tables an index may have.
pub(crate) const LSH_L: RangeInclusive<usize> = 1..=512;

/// How one side (keys or values) of an offloaded store holds its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 values (4 bytes each).
    F32,
    /// bf16 values (2 bytes each).
    Bf16,
    /// int8 codes with one scale per channel around the head's mean, fixed by
    /// the first rows stored (the prefill) with a quarter of headroom; later
    /// rows beyond that range are clamped.
    Int8,
    /// int4 codes, see [`KvDtype`].
    Int4,
    /// int2 codes, see [`KvDtype`].
    Int2,
}

impl Precision {
    /// Bits per value, as the policy strings' `kbits`/`vbits` write it.
    pub fn bits(self) -> usize {
        match self {
            Precision::F32 => 32,
            Precision::Bf16 => 16,
            Precision::Int8 => 8,
            Precision::Int4 => 4,
            Precision::Int2 => 2,
        }
    }

    /// The precision of `bits` bits per value, if there is one.
    pub fn from_bits(bits: usize) -> Option<Self> {
        Some(match bits {
            32 => Precision::F32,
            16 => Precision::Bf16,
            8 => Precision::Int8,
            4 => Precision::Int4,
            2 => Precision::Int2,
            _ => return None,
        })
    }

    /// The packed code width of int4 and int2 rows.
    pub(crate) fn code_bits(self) -> Option<CodeBits> {
        match self {
            Precision::Int4 => Some(CodeBits::Four),
            Precision::Int2 => Some(CodeBits::Two),
            _ => None,
        }
    }
}

/// `f32`, `bf16`, `int8`, `int4`, `int2`.
impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Precision::F32 => write!(f, "f32"),
            Precision::Bf16 => write!(f, "bf16"),
            other => write!(f, "int{}", other.bits()),
        }
    }
}

/// Channels per group of an int4 or int2 value row (or the whole row when
/// it is shorter): each group has its own range.
pub const VALUE_GROUP: usize = 32;

/// Groups an int4 or int2 value row may have (head dimensions up to 2048):
/// pass 2 keeps a weight per group on the stack.
pub(crate) const MAX_VALUE_GROUPS: usize = 64;

/// Bytes of the range (`lo` and `step`, two f16) beside each int4 or int2
/// key row, and beside each group of an int4 or int2 value row.
pub(crate) const RANGE_BYTES: usize = 4;

/// How the K and V rows of an offloaded store are held: one [`Precision`]
/// for the keys, one for the values (the policy strings' `kbits`, `vbits`).
///
/// int8 rows (either side) have one scale per channel, fixed at the prefill.
/// int4 and int2 rows are asymmetric per row, so every token is quantized on
/// arrival: no staging buffer, any number of appended tokens, nothing
/// clamped within f16's range (sampled attention reads scattered rows, where per-block scales
/// would cost more bytes per touched block than the codes they serve).
/// - Keys: `k ≈ m + s ⊙ Rᵀ(lo + step · code)`, with the channel centring
///   `m` fixed per head as int8 keys fix theirs, `R` a fixed rotation (a
///   Walsh–Hadamard transform after sign flips, for head dimensions that are
///   powers of two; QuaRot's) that spreads the outlier channels over every
///   channel, the scales `s` per channel for int2 (as int8's) and one shared
///   scale for rotated int4 rows (per-channel scales would round the outlier
///   channels coarser, and the queries weigh those most), and `lo`, `step`
///   per row over the rotated values `R (k - m) / s`, stored as f16 beside
///   the codes; `q · k` is then `q · m + lo Σ q' + step (q' · code)` with
///   `q' = R (q ⊙ s)`, the last term on integers.
///   A rotated row is near Gaussian, so int2 key codes sit at the step of
///   least squared error for Gaussian values (about one standard deviation,
///   clipping the tails) rather than stretched over the row's range; int4
///   codes span the range.
/// - Values: per row and group of [`VALUE_GROUP`] channels, `v ≈ lo + step ·
///   code` (KIVI's per-token groups), f16 ranges beside the codes (rotating
///   them, with or without clipping, measured no better).
///
/// A key of head dimension 128 is then 68 bytes at int4 and 36 at int2 where
/// a bf16 key is 256: sampled attention reads one row per retrieved key from
/// memory at random.
///
/// TurboAttention's head-wise mixed precision (`int2_heads`): that many kv
/// heads of the layer, those whose prefill keys have the least range ×
/// standard deviation (the heads whose keys a 2-bit grid spans best), hold
/// their keys and values at int2 instead; the choice is made at the prefill
/// load ([`crate::LayerStore::load_prefill`]), so a store filled by appends
/// alone keeps every head at `keys`/`values`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvDtype {
    /// How the keys are held.
    pub keys: Precision,
    /// How the values are held.
    pub values: Precision,
    /// kv heads per layer held at int2 keys and values instead (see above).
    pub int2_heads: u8,
}

impl Default for KvDtype {
    fn default() -> Self {
        KvDtype::BF16
    }
}

impl KvDtype {
    /// bf16 keys and values (the default).
    pub const BF16: KvDtype = KvDtype::new(Precision::Bf16, Precision::Bf16);
    /// f32 keys and values.
    pub const F32: KvDtype = KvDtype::new(Precision::F32, Precision::F32);
    /// int8 keys, bf16 values (`kbits=8`).
    pub const K8: KvDtype = KvDtype::new(Precision::Int8, Precision::Bf16);
    /// int8 keys and values (`kbits=8,vbits=8`).
    pub const K8V8: KvDtype = KvDtype::new(Precision::Int8, Precision::Int8);

    /// Keys and values of the given precisions.
    pub const fn new(keys: Precision, values: Precision) -> Self {
        KvDtype {
            keys,
            values,
            int2_heads: 0,
        }
    }

    /// Keys and values of int2, the precision of the `int2_heads`.
    pub const INT2: KvDtype = KvDtype::new(Precision::Int2, Precision::Int2);

    /// These precisions with `heads` kv heads at int2 (see above).
    pub const fn with_int2_heads(self, heads: u8) -> Self {
        KvDtype {
            int2_heads: heads,
            ..self
        }
    }

    /// Whether any row of the store is int4 or int2 (packed codes), its
    /// `int2_heads` included.
    pub fn holds_packed_rows(self) -> bool {
        self.int2_heads > 0 || self.keys.code_bits().is_some() || self.values.code_bits().is_some()
    }

    /// Whether `int2_heads` can be chosen among `n_kv_heads` kv heads: at
    /// most that many, and among at most 64 (the heads are kept as bits).
    pub fn int2_heads_fit(self, n_kv_heads: usize) -> bool {
        let int2 = usize::from(self.int2_heads);
        int2 <= n_kv_heads && (int2 == 0 || n_kv_heads <= 64)
    }

    /// The values' precision when a policy string gives only `kbits`: f32
    /// beside f32 keys, else bf16.
    pub fn default_values(keys: Precision) -> Precision {
        match keys {
            Precision::F32 => Precision::F32,
            _ => Precision::Bf16,
        }
    }

    /// Bytes of one stored key row of dimension `d` (per-head parameters,
    /// such as int8 channel scales, not counted).
    pub fn key_bytes(self, d: usize) -> usize {
        match self.keys.code_bits() {
            Some(bits) => packed_len(d, bits) + RANGE_BYTES,
            None => self.keys.bits() / 8 * d,
        }
    }

    /// Bytes of one stored value row of dimension `d`.
    pub fn value_bytes(self, d: usize) -> usize {
        match self.values.code_bits() {
            Some(bits) => packed_len(d, bits) + RANGE_BYTES * d.div_ceil(VALUE_GROUP),
            None => self.values.bits() / 8 * d,
        }
    }

    /// Bytes of one stored key and its value, each of dimension `d`.
    pub fn pair_bytes(self, d: usize) -> usize {
        self.key_bytes(d) + self.value_bytes(d)
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
            kv_dtype: KvDtype::BF16,
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
        let packed_values = self.kv_dtype.values.code_bits().is_some();
        if packed_values && self.head_dim > VALUE_GROUP * MAX_VALUE_GROUPS {
            return Err(CpuError::Config(format!(
                "int4 and int2 values need head_dim <= {}, not {}",
                VALUE_GROUP * MAX_VALUE_GROUPS,
                self.head_dim
            )));
        }
        if !self.kv_dtype.int2_heads_fit(self.n_kv_heads) {
            return Err(CpuError::Config(format!(
                "int2_heads={} on a layer of {} kv heads (int2_heads chooses among at most 64)",
                self.kv_dtype.int2_heads, self.n_kv_heads
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
