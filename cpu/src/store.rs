//! The offloaded KV store of one (sequence, layer) and its SimHash LSH index.
//!
//! Keys are centred by the mean of the keys loaded by [`LayerStore::load_prefill`]
//! (per kv head). The mean is fixed then: keys appended later by
//! [`LayerStore::append`] are centred with the same fixed mean (it is never
//! recomputed, so codes already in the tables stay valid). Centring is used for
//! hashing and for the angle in the estimator; logits use the raw keys so that
//! partials merge exactly with parts computed elsewhere on uncentred keys
//! (q·(k-μ) and q·k differ by a per-query constant).
//!
//! Index layout per kv head: for each of the L tables, the prefill keys sorted
//! by bucket, each bucket's ascending key ids stored as 12-bit gaps (a gap of
//! 4095 or more is an escape unit followed by the 24-bit id in two units), with
//! one u32 offset (in units) per bucket. That is ~1.5 bytes per key per table
//! (MagicPIG-like u32 ids would be 4). Keys appended during decode are kept as
//! their L u16 codes and scanned linearly at query time. Prefill loads are
//! limited to 2^24 keys per store when an index is used.

use crate::attention::LnUTable;
use crate::CpuError;
use half::{bf16, f16};
use std::sync::{Mutex, MutexGuard};
use tandem_kernels::hash::{table_code, Projector};
use tandem_kernels::rng::SplitMix64;

/// Shape and index parameters of one layer's offloaded store.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Number of kv heads.
    pub n_kv_heads: usize,
    /// Query heads per kv head (GQA group size), 1..=8.
    pub group: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// SimHash index (K bits, L tables), or `None` for no index (dense/top-k/oracle only).
    pub lsh: Option<(usize, usize)>,
    /// Collision threshold the estimator's probabilities are computed for.
    pub lsh_t: u8,
    /// Seed; hyperplanes are derived from (seed, layer, kv head).
    pub seed: u64,
    /// Layer index (part of the hyperplane seed).
    pub layer: u32,
}

impl Default for LayerConfig {
    /// One kv head of dimension 128, no GQA, no index; fill in the rest with
    /// struct update syntax.
    fn default() -> Self {
        LayerConfig {
            n_kv_heads: 1,
            group: 1,
            head_dim: 128,
            lsh: None,
            lsh_t: 2,
            seed: 0,
            layer: 0,
        }
    }
}

impl LayerConfig {
    fn validate(&self) -> Result<(), CpuError> {
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
        if let Some((k, l)) = self.lsh {
            if !(1..=16).contains(&k) {
                return Err(CpuError::Config(format!("K={k} not in 1..=16")));
            }
            if !(1..=512).contains(&l) {
                return Err(CpuError::Config(format!("L={l} not in 1..=512")));
            }
            if self.lsh_t == 0 || self.lsh_t as usize > l {
                return Err(CpuError::Config(format!("t={} not in 1..=L", self.lsh_t)));
            }
        }
        Ok(())
    }
}

const ESCAPE: u32 = 0xFFF;
/// Ids must fit in the 24 bits of an escaped gap.
const MAX_PREFILL_KEYS: usize = 1 << 24;

/// Appends 12-bit units to a byte vector.
struct UnitWriter<'a> {
    bytes: &'a mut Vec<u8>,
    units: usize,
}

impl UnitWriter<'_> {
    fn push(&mut self, u: u32) {
        if self.units.is_multiple_of(2) {
            self.bytes.push((u & 0xFF) as u8);
            self.bytes.push(((u >> 8) & 0xF) as u8);
        } else if let Some(last) = self.bytes.last_mut() {
            *last |= ((u & 0xF) << 4) as u8;
            self.bytes.push((u >> 4) as u8);
        }
        self.units += 1;
    }
}

pub(crate) struct LshIndex {
    pub(crate) k: usize,
    pub(crate) l: usize,
    pub(crate) projector: Projector,
    /// Keys covered by the CSR tables (the prefill keys).
    pub(crate) n_bulk: usize,
    /// `l * (2^k + 1)` offsets (in 12-bit units) into `packed`.
    pub(crate) offsets: Vec<u32>,
    /// 12-bit units, two per three bytes (plus one spare byte at the end).
    pub(crate) packed: Vec<u8>,
    /// `l` codes per key appended after prefill.
    pub(crate) tail_codes: Vec<u16>,
    pub(crate) ln_u: LnUTable,
}

impl LshIndex {
    fn new(cfg: &LayerConfig, kv_head: usize, k: usize, l: usize) -> Result<Self, CpuError> {
        let d = cfg.head_dim;
        let mut rng = SplitMix64(
            cfg.seed ^ (u64::from(cfg.layer) << 32) ^ (kv_head as u64).wrapping_mul(0x1000_0001),
        );
        let planes: Vec<f32> = (0..k * l * d).map(|_| rng.normal() as f32).collect();
        let projector = Projector::new(d, k * l, &planes)
            .map_err(|e| CpuError::Config(format!("hyperplanes: {e}")))?;
        Ok(LshIndex {
            k,
            l,
            projector,
            n_bulk: 0,
            offsets: vec![0; l * ((1 << k) + 1)],
            packed: Vec::new(),
            tail_codes: Vec::new(),
            ln_u: LnUTable::new(k, l, cfg.lsh_t),
        })
    }

    #[inline]
    fn unit(&self, u: usize) -> u32 {
        let b = 3 * u / 2;
        let v = u32::from(self.packed[b]) | u32::from(self.packed[b + 1]) << 8;
        if u.is_multiple_of(2) {
            v & 0xFFF
        } else {
            v >> 4
        }
    }

    /// Calls `f` with every prefill key id in bucket `code` of table `table`,
    /// in increasing order.
    #[inline]
    pub(crate) fn for_each_in_bucket(&self, table: usize, code: u16, mut f: impl FnMut(u32)) {
        let nb = (1usize << self.k) + 1;
        let i = table * nb + code as usize;
        let (mut u, end) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        let mut prev = 0u32;
        while u < end {
            let x = self.unit(u);
            if x == ESCAPE {
                prev = self.unit(u + 1) << 12 | self.unit(u + 2);
                u += 3;
            } else {
                prev += x;
                u += 1;
            }
            f(prev);
        }
    }

    fn bytes(&self) -> usize {
        self.offsets.len() * 4 + self.packed.len() + self.tail_codes.len() * 2
    }
}

/// The offloaded K/V rows and index of one kv head.
pub(crate) struct HeadStore {
    pub(crate) keys: Vec<bf16>,
    pub(crate) values: Vec<bf16>,
    pub(crate) mean: Vec<f32>,
    /// |k - mean| per key, stored as f16 (relative error <= 2^-11), used only
    /// for the angle in the estimator.
    pub(crate) knorm: Vec<f16>,
    pub(crate) index: Option<LshIndex>,
    /// Reused buffers of [`HeadStore::append`]: a centred key and its sign bits.
    centred: Vec<f32>,
    bits: Vec<u64>,
}

impl HeadStore {
    /// Appends key/value rows (`[n][head_dim]` each), centred with the fixed
    /// mean and hashed into every table.
    pub(crate) fn append(&mut self, keys: &[bf16], values: &[bf16]) {
        let d = self.mean.len();
        self.keys.extend_from_slice(keys);
        self.values.extend_from_slice(values);
        self.centred.resize(d, 0.0);
        for k in keys.chunks_exact(d) {
            for ((c, x), m) in self.centred.iter_mut().zip(k).zip(&self.mean) {
                *c = x.to_f32() - m;
            }
            let norm = self.centred.iter().map(|x| x * x).sum::<f32>().sqrt();
            self.knorm.push(f16::from_f32(norm));
            if let Some(ix) = self.index.as_mut() {
                self.bits.resize(ix.projector.words_per_vector(), 0);
                ix.projector.sign_bits(&self.centred, &mut self.bits);
                for t in 0..ix.l {
                    ix.tail_codes.push(table_code(&self.bits, t, ix.k));
                }
            }
        }
    }

    /// Tokens stored.
    pub(crate) fn len(&self) -> usize {
        self.keys.len() / self.mean.len()
    }
}

/// The offloaded KV cache of one (sequence, layer): all kv heads, bf16 rows.
///
/// Each kv head sits behind its own lock, so the worker attending one head can
/// append that head's evicted rows while other workers read other heads; share
/// the store between the pool and its owner as an `Arc<LayerStore>`.
pub struct LayerStore {
    cfg: LayerConfig,
    heads: Vec<Mutex<HeadStore>>,
}

impl LayerStore {
    /// An empty store.
    pub fn new(cfg: LayerConfig) -> Result<Self, CpuError> {
        cfg.validate()?;
        let mut heads = Vec::with_capacity(cfg.n_kv_heads);
        for h in 0..cfg.n_kv_heads {
            let index = match cfg.lsh {
                Some((k, l)) => Some(LshIndex::new(&cfg, h, k, l)?),
                None => None,
            };
            heads.push(Mutex::new(HeadStore {
                keys: Vec::new(),
                values: Vec::new(),
                mean: vec![0.0; cfg.head_dim],
                knorm: Vec::new(),
                index,
                centred: Vec::new(),
                bits: Vec::new(),
            }));
        }
        Ok(LayerStore { cfg, heads })
    }

    /// Locks kv head `h`. A poisoned lock (a panic while appending) is an error:
    /// the head's rows may be half-written.
    pub(crate) fn head(&self, h: usize) -> Result<MutexGuard<'_, HeadStore>, CpuError> {
        self.heads
            .get(h)
            .ok_or_else(|| CpuError::Shape(format!("kv head {h} out of range")))?
            .lock()
            .map_err(|_| CpuError::Worker(format!("kv head {h} was poisoned by a failed step")))
    }

    fn heads_mut(&mut self) -> impl Iterator<Item = &mut HeadStore> {
        self.heads
            .iter_mut()
            .map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()))
    }

    fn sum_over_heads(&self, f: impl Fn(&HeadStore) -> usize) -> usize {
        (0..self.heads.len())
            .map(|h| self.head(h).map_or(0, |g| f(&g)))
            .sum()
    }

    /// The configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// Number of tokens stored (of kv head 0; every head receives the same rows).
    pub fn len(&self) -> usize {
        self.head(0).map_or(0, |h| h.len())
    }

    /// True when no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of K and V rows.
    pub fn kv_bytes(&self) -> usize {
        self.sum_over_heads(|h| (h.keys.len() + h.values.len()) * 2)
    }

    /// Bytes of the index: tables, decode-time codes, key norms and means.
    pub fn index_bytes(&self) -> usize {
        self.sum_over_heads(|h| {
            h.index.as_ref().map_or(0, LshIndex::bytes) + h.knorm.len() * 2 + h.mean.len() * 4
        })
    }

    /// Bulk-loads the prompt keys and values after prefill: `keys` and `values`
    /// are `[n_tokens][n_kv_heads][head_dim]`. Must be called on an empty store.
    /// Fixes the centring mean and builds the LSH tables with `threads` threads
    /// (a blocked projection, then a counting sort per table).
    pub fn load_prefill(
        &mut self,
        keys: &[bf16],
        values: &[bf16],
        threads: usize,
    ) -> Result<(), CpuError> {
        let (nh, d) = (self.cfg.n_kv_heads, self.cfg.head_dim);
        if keys.len() != values.len() || !keys.len().is_multiple_of(nh * d) {
            return Err(CpuError::Shape(format!(
                "keys {} / values {} not a multiple of n_kv_heads*head_dim = {}",
                keys.len(),
                values.len(),
                nh * d
            )));
        }
        if !self.is_empty() {
            return Err(CpuError::Config("load_prefill on a non-empty store".into()));
        }
        if let Some((_, l)) = self.cfg.lsh {
            // Offsets are u32 counts of 12-bit units (at most 3 units per entry).
            if (keys.len() / (nh * d)).saturating_mul(l).saturating_mul(3) >= u32::MAX as usize {
                return Err(CpuError::Shape(
                    "prefill too large for the index offsets".into(),
                ));
            }
        }
        let n = keys.len() / (nh * d);
        if n >= MAX_PREFILL_KEYS {
            return Err(CpuError::Shape(format!(
                "at most {MAX_PREFILL_KEYS} prefill tokens per store"
            )));
        }
        for (h, head) in self.heads_mut().enumerate() {
            head.keys.reserve(n * d);
            head.values.reserve(n * d);
            for t in 0..n {
                let o = (t * nh + h) * d;
                head.keys.extend_from_slice(&keys[o..o + d]);
                head.values.extend_from_slice(&values[o..o + d]);
            }
        }
        let threads = threads.max(1);
        let per = self.heads.len().div_ceil(threads);
        let mut heads: Vec<&mut HeadStore> = self.heads_mut().collect();
        std::thread::scope(|s| {
            for chunk in heads.chunks_mut(per) {
                s.spawn(move || chunk.iter_mut().for_each(|h| build_head(h, n, d)));
            }
        });
        Ok(())
    }

    /// Appends tokens (`keys`, `values`: `[n][n_kv_heads][head_dim]`), centred
    /// with the fixed prefill mean and inserted into every table.
    pub fn append(&self, keys: &[bf16], values: &[bf16]) -> Result<(), CpuError> {
        let (nh, d) = (self.cfg.n_kv_heads, self.cfg.head_dim);
        if keys.len() != values.len() || !keys.len().is_multiple_of(nh * d) {
            return Err(CpuError::Shape(format!(
                "append expects rows of {} values, got {} keys and {} values",
                nh * d,
                keys.len(),
                values.len()
            )));
        }
        for h in 0..nh {
            let mut head = self.head(h)?;
            for (k, v) in keys.chunks_exact(nh * d).zip(values.chunks_exact(nh * d)) {
                head.append(&k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d]);
            }
        }
        Ok(())
    }
}

fn build_head(head: &mut HeadStore, n: usize, d: usize) {
    let mut mean = vec![0.0f64; d];
    for row in head.keys.chunks_exact(d) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x.to_f64();
        }
    }
    if n > 0 {
        for (dst, m) in head.mean.iter_mut().zip(&mean) {
            *dst = (*m / n as f64) as f32;
        }
    }
    const BLOCK: usize = 1024;
    let mut centred = vec![0.0f32; BLOCK * d];
    head.knorm = Vec::with_capacity(n);
    let Some(ix) = head.index.as_mut() else {
        for row in head.keys.chunks_exact(d) {
            let s: f32 = row
                .iter()
                .zip(&head.mean)
                .map(|(x, m)| (x.to_f32() - m).powi(2))
                .sum();
            head.knorm.push(f16::from_f32(s.sqrt()));
        }
        return;
    };
    let (k, l) = (ix.k, ix.l);
    let w = ix.projector.words_per_vector();
    let mut bits = vec![0u64; BLOCK * w];
    let mut codes = vec![0u16; n * l]; // table-major
    for b0 in (0..n).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(n);
        for (i, t) in (b0..b1).enumerate() {
            let row = &head.keys[t * d..(t + 1) * d];
            let dst = &mut centred[i * d..(i + 1) * d];
            let mut s = 0.0f32;
            for j in 0..d {
                dst[j] = row[j].to_f32() - head.mean[j];
                s += dst[j] * dst[j];
            }
            head.knorm.push(f16::from_f32(s.sqrt()));
        }
        let m = b1 - b0;
        ix.projector
            .sign_bits(&centred[..m * d], &mut bits[..m * w]);
        for t in 0..l {
            let dst = &mut codes[t * n + b0..t * n + b0 + m];
            for (i, c) in dst.iter_mut().enumerate() {
                *c = table_code(&bits[i * w..(i + 1) * w], t, k);
            }
        }
    }
    // Counting sort per table.
    let nb = 1usize << k;
    ix.n_bulk = n;
    let mut ids = vec![0u32; n];
    let mut cursor = vec![0u32; nb];
    let mut packed = Vec::with_capacity(n * l * 3 / 2 + 64);
    let mut writer = UnitWriter {
        bytes: &mut packed,
        units: 0,
    };
    for t in 0..l {
        let off = &mut ix.offsets[t * (nb + 1)..(t + 1) * (nb + 1)];
        off.iter_mut().for_each(|o| *o = 0);
        let c = &codes[t * n..(t + 1) * n];
        for &code in c {
            off[code as usize + 1] += 1;
        }
        for b in 0..nb {
            off[b + 1] += off[b];
        }
        cursor.copy_from_slice(&off[..nb]);
        for (i, &code) in c.iter().enumerate() {
            ids[cursor[code as usize] as usize] = i as u32;
            cursor[code as usize] += 1;
        }
        // Re-express the offsets in units while encoding each bucket.
        for b in 0..nb {
            let (s0, s1) = (off[b] as usize, off[b + 1] as usize);
            off[b] = writer.units as u32;
            let mut prev = 0u32;
            for &id in &ids[s0..s1] {
                let gap = id - prev;
                if gap < ESCAPE {
                    writer.push(gap);
                } else {
                    writer.push(ESCAPE);
                    writer.push(id >> 12);
                    writer.push(id & 0xFFF);
                }
                prev = id;
            }
        }
        off[nb] = writer.units as u32;
    }
    // A spare byte so a unit read may always touch two bytes.
    packed.push(0);
    packed.shrink_to_fit();
    ix.packed = packed;
}
