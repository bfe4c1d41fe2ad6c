//! The offloaded KV store of one (sequence, layer) and its SimHash LSH index.
//!
//! K and V rows are held as bf16 or f32, or as int8 codes with one scale per
//! channel (keys only, or keys and values; [`KvDtype`], chosen per layer).
//!
//! Keys are centred by the mean of the keys loaded by [`LayerStore::load_prefill`]
//! (per kv head). The mean is fixed then: keys appended later by
//! [`LayerStore::append`] (or evicted through the worker pool) are centred with
//! the same fixed mean (it is never recomputed, so codes already in the tables
//! stay valid, and a later key's hash and angle are those of `k - mean_prefill`;
//! if the appended keys drift, their angles are measured from a stale centre,
//! which only changes which keys are sampled and their probabilities, never
//! exactness of the estimate's formula). A store that was never prefilled uses
//! a zero mean. Centring is used for hashing and for the angle in the
//! estimator; logits use the raw keys so that partials merge exactly with parts
//! computed elsewhere on uncentred keys (q·(k-μ) and q·k differ by a per-query
//! constant).
//!
//! Index layout per kv head, three levels, each covering a contiguous range of
//! key ids:
//! - **bulk**: for each of the L tables, the keys sorted by bucket, each
//!   bucket's ascending key ids stored as 12-bit gaps (`tandem_kernels::gaps`:
//!   a gap of 4095 or more takes one escape unit per 4095), with one u32 offset
//!   (in units) per bucket: ~1.6 bytes per key per table (u32 ids, as in
//!   MagicPIG, would be 4). Built in bulk from the prefill keys.
//! - **mid**: the same format for keys appended since the last bulk merge.
//! - **raw**: the newest appended keys (fewer than [`RAW_MAX`]) as their L u16
//!   codes, compared with the query's codes by a SIMD scan.
//!
//! When the raw level reaches [`RAW_MAX`] keys it is folded into mid; when mid
//! reaches `max(MID_MIN, bulk / 8)` keys it is folded into bulk (a linear
//! merge of the bucket lists; appended ids are larger than every id already
//! stored, so each bucket's list is extended at its end). Retrieval therefore
//! decodes, per table, one bucket of bulk and one of mid and scans at most
//! `RAW_MAX` raw keys: its cost follows the collisions, not the number of
//! tokens appended. The folds are linear merges: raw -> mid rewrites mid (every
//! `RAW_MAX` tokens), mid -> bulk rewrites bulk (every `max(MID_MIN, bulk/8)`
//! tokens, tens of milliseconds per kv head at 96k, on the worker whose append
//! triggers it). Measured at 96k with K=10, L=150: ~370 us of append work per
//! token per layer on average (hashing and merges, 8 kv heads). A store holds at
//! most 2^24 - 1 tokens when an index is used.
//!
//! Hyperplanes: one set of Gaussian planes per seed, shared by every layer and
//! kv head of the process; each (layer, kv head) flips the signs of its input
//! dimensions with its own seeded +-1 vector, so its planes are still exactly
//! Gaussian and differ from every other head's.

use crate::attention::LnUTable;
use crate::CpuError;
use half::{bf16, f16};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;
use tandem_kernels::gaps::{count_pairs, decode_gaps, Bucket, GapWriter};
use tandem_kernels::hash::{table_code, Projector};
use tandem_kernels::mem::{HugeBuf, OutOfMemory, Plain, HUGE_PAGE};
use tandem_kernels::rng::SplitMix64;

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
    /// are fixed by the first rows stored (the prefill) with headroom
    /// ([`KEY_RANGE_HEADROOM`]); later keys beyond that range are clamped. A
    /// store that was never prefilled fixes them from its first appended rows
    /// with 4 times more room, a coarser grid.
    K8,
    /// Keys as in [`KvDtype::K8`], and values too as int8 codes with one scale
    /// per channel around their mean (`k8v8`): half the bytes of bf16 rows for
    /// both, so a retrieved key and its value are two cache lines each.
    K8V8,
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
    /// SimHash index (K bits, L tables), or `None` for no index (dense/top-k/oracle only).
    pub lsh: Option<(usize, usize)>,
    /// Collision threshold the estimator's probabilities are computed for.
    pub lsh_t: u8,
    /// Seed; hyperplanes are derived from (seed, layer, kv head).
    pub seed: u64,
    /// Layer index (part of the hyperplane seed).
    pub layer: u32,
    /// Element type the K and V rows are stored in.
    pub kv_dtype: KvDtype,
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
            lsh_t: 2,
            seed: 0,
            layer: 0,
            kv_dtype: KvDtype::Bf16,
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

/// Tokens an indexed store holds at most, so that the tables' u32 offsets
/// (12-bit units, a little over one per entry) stay far from overflowing as
/// it grows.
const MAX_INDEXED_KEYS: usize = (1 << 24) - 1;
/// Raw (unbucketed) appended keys kept before they are folded into the mid level.
pub const RAW_MAX: usize = 512;
/// The mid level is folded into bulk when it holds `max(MID_MIN, bulk / 8)` keys.
pub const MID_MIN: usize = 8192;

/// The hyperplanes for `(seed, dim, n_planes)`: `n_planes` rows of `dim`
/// standard normals drawn from splitmix64 seeded with `seed`, built once per
/// process and shared (while any store uses them) by every layer and kv head.
/// One copy keeps them in cache: per-head planes (770 KB each at K=10, L=150,
/// d=128) would be re-read from memory for every kv head of every layer at
/// every decode step.
fn shared_projector(seed: u64, dim: usize, n_planes: usize) -> Result<Arc<Projector>, CpuError> {
    static CACHE: SharedCache<(u64, usize, usize), Projector> = OnceLock::new();
    shared(&CACHE, (seed, dim, n_planes), || {
        let mut rng = SplitMix64(seed);
        let planes: Vec<f32> = (0..n_planes * dim).map(|_| rng.normal() as f32).collect();
        Projector::new(dim, n_planes, &planes)
            .map_err(|e| CpuError::Config(format!("hyperplanes: {e}")))
    })
}

/// The `ln u` table for `(K, L, t)`, built once per process and shared by
/// every store with those parameters, so that one 32 KB copy stays in cache
/// where one per layer and kv head (7.7 MB at 30 layers of 8) was read from
/// memory by every step's gathers.
fn shared_ln_u(k: usize, l: usize, t: u8) -> Arc<LnUTable> {
    static CACHE: SharedCache<(usize, usize, u8), LnUTable> = OnceLock::new();
    let Ok(table) = shared(&CACHE, (k, l, t), || {
        Ok::<_, std::convert::Infallible>(LnUTable::new(k, l, t))
    });
    table
}

/// Values shared while any store holds them, by key.
type SharedCache<K, T> = OnceLock<Mutex<Vec<(K, Weak<T>)>>>;

/// The live value for `key` in `cache`, or a new one from `make`.
fn shared<K: PartialEq, T, E>(
    cache: &SharedCache<K, T>,
    key: K,
    make: impl FnOnce() -> Result<T, E>,
) -> Result<Arc<T>, E> {
    let mut cache = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache.retain(|(_, w)| w.strong_count() > 0);
    if let Some(p) = cache
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(p);
    }
    let p = Arc::new(make()?);
    cache.push((key, Arc::downgrade(&p)));
    Ok(p)
}

/// `v` copied into huge pages: a retrieval reads a few lines of each of
/// hundreds of buckets spread over a level's tens of megabytes, and in 4 KB
/// pages nearly each of them needed a page walk (96k decode, retrieval 304 ->
/// 279 us per task).
fn huge_copy<T: Plain>(v: &[T]) -> Result<HugeBuf<T>, OutOfMemory> {
    let mut b = HugeBuf::with_capacity(v.len(), true)?;
    b.extend_map(v, |x| x);
    Ok(b)
}

/// One level of packed bucket lists: keys `base..base + n`, ids stored relative
/// to `base`.
pub(crate) struct Csr {
    pub(crate) base: u32,
    pub(crate) n: usize,
    /// `2^k + 1`: offsets per table.
    stride: usize,
    /// `l * (2^k + 1)` offsets (in 12-bit units) into `packed`.
    offsets: HugeBuf<u32>,
    /// 12-bit units, two per three bytes (plus spare bytes at the end).
    packed: HugeBuf<u8>,
}

impl Csr {
    /// Builds the level from table-major codes (`codes[t * m + i]` is key
    /// `base + i`'s code in table `t`).
    fn build(codes: &[u16], m: usize, base: u32, k: usize, l: usize) -> Result<Csr, OutOfMemory> {
        let nb = 1usize << k;
        let mut offsets = vec![0u32; l * (nb + 1)];
        let mut ids = vec![0u32; m];
        let mut cursor = vec![0u32; nb];
        let mut w = GapWriter::with_capacity(m * l);
        for t in 0..l {
            let off = &mut offsets[t * (nb + 1)..(t + 1) * (nb + 1)];
            let c = &codes[t * m..(t + 1) * m];
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
                off[b] = w.units() as u32;
                let mut prev = 0u32;
                for &id in &ids[s0..s1] {
                    w.push_id(prev, id);
                    prev = id;
                }
            }
            off[nb] = w.units() as u32;
        }
        Ok(Csr {
            base,
            n: m,
            stride: nb + 1,
            offsets: huge_copy(&offsets)?,
            packed: huge_copy(&w.finish())?,
        })
    }

    /// The level holding `a`'s keys followed by `b`'s (`b.base == a.base + a.n`).
    fn merge(a: &Csr, b: &Csr, k: usize, l: usize) -> Result<Csr, OutOfMemory> {
        let nb = 1usize << k;
        let mut offsets = vec![0u32; l * (nb + 1)];
        let mut w = GapWriter::with_capacity((a.packed.len() + b.packed.len()) * 2 / 3);
        let mut ids = Vec::new();
        let shift = b.base - a.base;
        for t in 0..l {
            for c in 0..nb {
                offsets[t * (nb + 1) + c] = w.units() as u32;
                let mut prev = 0u32;
                let (u, end) = a.bucket(t, c);
                for &id in a.decode_units(u, end, &mut ids) {
                    w.push_id(prev, id);
                    prev = id;
                }
                let (u, end) = b.bucket(t, c);
                for &id in b.decode_units(u, end, &mut ids) {
                    w.push_id(prev, id + shift);
                    prev = id + shift;
                }
            }
            offsets[t * (nb + 1) + nb] = w.units() as u32;
        }
        Ok(Csr {
            base: a.base,
            n: a.n + b.n,
            stride: nb + 1,
            offsets: huge_copy(&offsets)?,
            packed: huge_copy(&w.finish())?,
        })
    }

    /// Unit range of bucket `code` of table `table`.
    #[inline(always)]
    pub(crate) fn bucket(&self, table: usize, code: usize) -> (usize, usize) {
        let i = table * self.stride + code;
        match self.offsets.get(i..i + 2) {
            Some(o) => (o[0] as usize, o[1] as usize),
            None => (0, 0),
        }
    }

    /// Reads every cache line of `bucket`: see
    /// [`tandem_kernels::vector::touch_lines`].
    #[inline(always)]
    pub(crate) fn touch(&self, bucket: &Bucket) -> u8 {
        let (u, e) = (bucket.start as usize, bucket.end as usize);
        let bytes = self.packed.get(3 * u / 2..(3 * e).div_ceil(2));
        tandem_kernels::vector::touch_lines(bytes.unwrap_or(&[]))
    }

    /// Counts the collisions of `buckets` in `pairs` (indexed by key
    /// position): see [`count_pairs`].
    pub(crate) fn count_pairs(&self, buckets: &[Bucket], pairs: &mut [u8]) {
        count_pairs(&self.packed, buckets, self.base as usize, pairs);
    }

    /// Prefetches the offsets of bucket `code` of table `table`.
    #[inline(always)]
    pub(crate) fn prefetch_offsets(&self, table: usize, code: usize) {
        tandem_kernels::vector::prefetch_at(&self.offsets, table * self.stride + code);
    }

    /// The ids (relative to `base`, increasing) of the bucket in units
    /// `u..end`, decoded into `buf`.
    #[inline(always)]
    pub(crate) fn decode_units<'b>(
        &self,
        u: usize,
        end: usize,
        buf: &'b mut Vec<u32>,
    ) -> &'b [u32] {
        // A bucket of m units holds at most m ids.
        let units = end.saturating_sub(u);
        if buf.len() < units {
            buf.resize(units, 0);
        }
        let n = decode_gaps(&self.packed, u, end, buf);
        &buf[..n]
    }

    fn bytes(&self) -> usize {
        self.offsets.len() * 4 + self.packed.len()
    }
}

pub(crate) struct LshIndex {
    pub(crate) k: usize,
    pub(crate) l: usize,
    /// Gaussian hyperplanes shared by every store with the same seed and shape.
    pub(crate) projector: Arc<Projector>,
    /// ±1 per dimension, seeded by (seed, layer, kv head): this head's planes
    /// are the shared ones with these sign flips.
    signs: Vec<f32>,
    /// Prefill keys (and appended keys merged since).
    pub(crate) bulk: Option<Csr>,
    /// Appended keys bucketed since the last bulk merge.
    pub(crate) mid: Option<Csr>,
    /// Codes of the newest appended keys, key-major (`l` per key).
    pub(crate) raw_codes: Vec<u16>,
    pub(crate) ln_u: Arc<LnUTable>,
}

impl LshIndex {
    fn new(cfg: &LayerConfig, kv_head: usize, k: usize, l: usize) -> Result<Self, CpuError> {
        let d = cfg.head_dim;
        let projector = shared_projector(cfg.seed, d, k * l)?;
        let mut rng = SplitMix64(
            cfg.seed ^ (u64::from(cfg.layer) << 32) ^ (kv_head as u64).wrapping_mul(0x1000_0001),
        );
        let signs = (0..d)
            .map(|_| if rng.next_u64() & 1 == 1 { -1.0 } else { 1.0 })
            .collect();
        Ok(LshIndex {
            k,
            l,
            projector,
            signs,
            bulk: None,
            mid: None,
            raw_codes: Vec::new(),
            ln_u: shared_ln_u(k, l, cfg.lsh_t),
        })
    }

    /// Flips the signs of `x` (one or more rows of `head_dim`) by this head's
    /// signs, in place: vectors are hashed as `planes · (signs ⊙ x)`.
    pub(crate) fn flip(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.signs.len()) {
            for (v, s) in row.iter_mut().zip(&self.signs) {
                *v *= s;
            }
        }
    }

    /// Keys covered by the bucketed levels (bulk + mid); raw keys follow.
    pub(crate) fn n_bucketed(&self) -> usize {
        self.bulk.as_ref().map_or(0, |c| c.n) + self.mid.as_ref().map_or(0, |c| c.n)
    }

    /// The bucketed levels, oldest first.
    pub(crate) fn levels(&self) -> impl Iterator<Item = &Csr> {
        self.bulk.iter().chain(self.mid.iter())
    }

    /// Adds one appended key's codes; folds levels when they are full. Out of
    /// memory for a fold, the levels are left as they were (the codes stay
    /// raw, and the next append tries again).
    fn push_codes(&mut self, codes: &[u16]) -> Result<(), OutOfMemory> {
        self.raw_codes.extend_from_slice(codes);
        let l = self.l;
        let m = self.raw_codes.len() / l;
        if m < RAW_MAX {
            return Ok(());
        }
        let mut tm = vec![0u16; m * l];
        for (i, c) in self.raw_codes.chunks_exact(l).enumerate() {
            for (t, &x) in c.iter().enumerate() {
                tm[t * m + i] = x;
            }
        }
        let base = self.n_bucketed() as u32;
        let raw = Csr::build(&tm, m, base, self.k, l)?;
        let mid = match &self.mid {
            Some(mid) => Csr::merge(mid, &raw, self.k, l)?,
            None => raw,
        };
        self.raw_codes.clear();
        self.mid = Some(mid);
        let (n_bulk, n_mid) = (
            self.bulk.as_ref().map_or(0, |c| c.n),
            self.mid.as_ref().map_or(0, |c| c.n),
        );
        if n_mid >= MID_MIN.max(n_bulk / 8) {
            let merged = match (&self.bulk, &self.mid) {
                (Some(bulk), Some(mid)) => Some(Csr::merge(bulk, mid, self.k, l)?),
                _ => None,
            };
            match merged {
                Some(bulk) => self.bulk = Some(bulk),
                None => self.bulk = self.bulk.take().or(self.mid.take()),
            }
            self.mid = None;
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.levels().map(Csr::bytes).sum::<usize>() + self.raw_codes.len() * 2
    }
}

/// Bytes per block of stored rows: two huge pages.
const BLOCK_BYTES: usize = 2 * HUGE_PAGE;

/// Rows of `d` values in fixed blocks of a power-of-two number of rows, so
/// that the store grows by adding a block and never copies what it holds.
pub(crate) struct Blocks<T: Plain> {
    blocks: Vec<HugeBuf<T>>,
    pub(crate) d: usize,
    shift: u32,
    rows: usize,
}

impl<T: Plain> Blocks<T> {
    fn new(d: usize) -> Self {
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

    fn rows_per_block(&self) -> usize {
        1 << self.shift
    }

    /// Row `i`; panics if `i` is out of range.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize) -> &[T] {
        let block = &self.blocks[i >> self.shift];
        let o = (i & (self.rows_per_block() - 1)) * self.d;
        &block[o..o + self.d]
    }

    fn bytes(&self) -> usize {
        self.rows * self.d * std::mem::size_of::<T>()
    }

    /// Allocates blocks for `n` more rows, advised for huge pages at once:
    /// they are about to be filled.
    fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
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
    fn extend<S: Copy>(&mut self, src: &[S], f: impl Fn(S) -> T) -> Result<(), OutOfMemory> {
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

/// Stored rows of one kv head, `[n][head_dim]`.
pub(crate) enum Rows {
    Bf16(Blocks<bf16>),
    F32(Blocks<f32>),
    I8(CodeRows),
}

/// How far past the largest |k - mean| of the rows that fix an int8 store's
/// channel scales later keys may go before they are clamped: one step is
/// then `1.25 · max / 127`, under 1% of the channel's range, and keys appended
/// during decode have a quarter of the range to spare.
pub const KEY_RANGE_HEADROOM: f32 = 1.25;

/// The extra range an int8 store gives its rows when its scales are fixed by
/// appended rows (a store that was never prefilled, whose first rows may be a
/// single token's).
const UNPREFILLED_HEADROOM: f32 = 4.0;

/// int8 key rows with one scale per channel: `k ≈ offset + scales ⊙ code`.
pub(crate) struct CodeRows {
    pub(crate) codes: Blocks<i8>,
    /// Per channel; empty until the first rows fix them.
    pub(crate) scales: Vec<f32>,
    /// `1 / scales` (0 where a scale is 0).
    inverse: Vec<f32>,
    /// The head's centring mean when the scales were fixed.
    pub(crate) offset: Vec<f32>,
    /// One row being quantized (appends allocate nothing per row).
    row_codes: Vec<i8>,
}

impl CodeRows {
    /// Fixes the channel scales from `rows` around `offset`. With `rotary`
    /// (keys), a channel's scale also covers its rotary partners (the channel
    /// `d/2` away, and its neighbour, as the two RoPE layouts pair them), whose
    /// values a later position may rotate into it.
    fn fix_range<'r, T: Elem + 'r>(
        &mut self,
        offset: &[f32],
        rotary: bool,
        rows: impl Iterator<Item = &'r [T]>,
    ) {
        let d = self.codes.d;
        let mut max = vec![0.0f32; d];
        for r in rows {
            for ((m, x), o) in max.iter_mut().zip(r).zip(offset) {
                let v = (x.to_f32() - o).abs();
                if v.is_finite() {
                    *m = m.max(v);
                }
            }
        }
        let half = d / 2;
        self.scales = (0..d)
            .map(|c| {
                let mut m = max[c];
                if rotary {
                    m = m
                        .max(max[(c + half) % d])
                        .max(max.get(c ^ 1).copied().unwrap_or(0.0));
                }
                m * KEY_RANGE_HEADROOM / 127.0
            })
            .collect();
        self.inverse = self
            .scales
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .collect();
        self.offset = offset.to_vec();
    }

    fn push<T: Elem>(&mut self, row: &[T]) -> Result<(), OutOfMemory> {
        for (((c, x), o), inv) in self
            .row_codes
            .iter_mut()
            .zip(row)
            .zip(&self.offset)
            .zip(&self.inverse)
        {
            let v = (x.to_f32() - o) * inv;
            // NaN (a non-finite key) becomes 0: `as` saturates and maps NaN to 0.
            *c = v.round().clamp(-127.0, 127.0) as i8;
        }
        self.codes.extend(&self.row_codes, |x| x)
    }
}

impl Rows {
    /// Key rows of a store of `dtype`.
    fn keys(dtype: KvDtype, d: usize) -> Self {
        match dtype {
            KvDtype::Bf16 => Rows::Bf16(Blocks::new(d)),
            KvDtype::F32 => Rows::F32(Blocks::new(d)),
            KvDtype::K8 | KvDtype::K8V8 => Rows::codes(d),
        }
    }

    /// Value rows of a store of `dtype`.
    fn values(dtype: KvDtype, d: usize) -> Self {
        match dtype {
            KvDtype::Bf16 | KvDtype::K8 => Rows::Bf16(Blocks::new(d)),
            KvDtype::F32 => Rows::F32(Blocks::new(d)),
            KvDtype::K8V8 => Rows::codes(d),
        }
    }

    fn codes(d: usize) -> Self {
        Rows::I8(CodeRows {
            codes: Blocks::new(d),
            scales: Vec::new(),
            inverse: Vec::new(),
            offset: Vec::new(),
            row_codes: vec![0; d],
        })
    }

    /// Number of stored rows.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Rows::Bf16(b) => b.rows,
            Rows::F32(b) => b.rows,
            Rows::I8(c) => c.codes.rows,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::Bf16(b) => b.bytes(),
            Rows::F32(b) => b.bytes(),
            Rows::I8(c) => c.codes.bytes() + (c.scales.len() + c.offset.len()) * 4,
        }
    }

    /// Reserves room for `n` more rows, backed by huge pages where the OS
    /// allows (rows are read in random order).
    fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.reserve(n),
            Rows::F32(b) => b.reserve(n),
            Rows::I8(c) => c.codes.reserve(n),
        }
    }

    fn extend<T: Elem>(&mut self, src: &[T]) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.extend(src, Elem::to_bf16),
            Rows::F32(b) => b.extend(src, Elem::to_f32),
            Rows::I8(c) => {
                if c.scales.is_empty() {
                    // No prefill fixed the range: these rows do, around zero
                    // (the mean of a store that was never prefilled), with
                    // their rotary partners, as they may be keys, and with
                    // room for the rows to come, which they sample poorly.
                    let d = c.codes.d;
                    c.fix_range(&vec![0.0; d], true, src.chunks_exact(d));
                    c.scales.iter_mut().for_each(|s| *s *= UNPREFILLED_HEADROOM);
                    c.inverse
                        .iter_mut()
                        .for_each(|s| *s /= UNPREFILLED_HEADROOM);
                }
                for r in src.chunks_exact(c.codes.d) {
                    c.push(r)?;
                }
                Ok(())
            }
        }
    }

    /// Row `i` widened to f32 into `dst` (`dst.len()` values).
    fn row_f32(&self, i: usize, dst: &mut [f32]) {
        match self {
            Rows::Bf16(b) => {
                for (o, x) in dst.iter_mut().zip(b.row(i)) {
                    *o = x.to_f32();
                }
            }
            Rows::F32(b) => dst.copy_from_slice(b.row(i)),
            Rows::I8(c) => {
                for (((o, &x), s), m) in dst
                    .iter_mut()
                    .zip(c.codes.row(i))
                    .zip(&c.scales)
                    .zip(&c.offset)
                {
                    *o = m + s * f32::from(x);
                }
            }
        }
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

/// The offloaded K/V rows and index of one kv head.
pub(crate) struct HeadStore {
    pub(crate) keys: Rows,
    pub(crate) values: Rows,
    pub(crate) d: usize,
    pub(crate) mean: Vec<f32>,
    /// |k - mean| per key, stored as f16 (relative error <= 2^-11), used only
    /// for the angle in the estimator, and only for f32 rows: bf16 and int8
    /// rows give theirs with their dot products in pass 1.
    pub(crate) knorm: Vec<f16>,
    pub(crate) index: Option<LshIndex>,
    /// Reused buffers of [`HeadStore::append`]: a centred key, its sign bits
    /// and its codes.
    centred: Vec<f32>,
    bits: Vec<u64>,
    codes: Vec<u16>,
}

impl HeadStore {
    /// Appends key/value rows (`[n][head_dim]` each), centred with the fixed
    /// mean and hashed into every table.
    pub(crate) fn append<T: Elem>(&mut self, keys: &[T], values: &[T]) -> Result<(), String> {
        self.append_hashing(keys, values, &[], &mut Vec::new())
    }

    /// [`HeadStore::append`], which also writes the sign bits of `queries`
    /// (rows of `head_dim`) for the index's tables to `query_bits`
    /// (`words_per_vector` words a query; left empty without an index): the
    /// keys and the queries are hashed in one pass over the planes, which
    /// each step otherwise reads from memory twice.
    pub(crate) fn append_hashing<T: Elem>(
        &mut self,
        keys: &[T],
        values: &[T],
        queries: &[f32],
        query_bits: &mut Vec<u64>,
    ) -> Result<(), String> {
        let d = self.d;
        if self.index.is_some() && self.len() + keys.len() / d > MAX_INDEXED_KEYS {
            return Err(format!(
                "an indexed store holds at most {MAX_INDEXED_KEYS} tokens"
            ));
        }
        let first = self.len();
        self.keys.extend(keys).map_err(|e| e.to_string())?;
        self.values.extend(values).map_err(|e| e.to_string())?;
        let m = self.len() - first;
        // Keys are hashed as stored (rounded or quantized), as a bulk load
        // hashes them: centred, then the queries after them.
        let keeps_norms = self.keeps_norms();
        self.centred.clear();
        self.centred.resize(m * d, 0.0);
        for (i, row) in (first..first + m).zip(self.centred.chunks_exact_mut(d)) {
            self.keys.row_f32(i, row);
            for (c, mu) in row.iter_mut().zip(&self.mean) {
                *c -= mu;
            }
            if keeps_norms {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                self.knorm.push(f16::from_f32(norm));
            }
        }
        query_bits.clear();
        let Some(ix) = self.index.as_mut() else {
            return Ok(());
        };
        let q = queries.len() / d;
        self.centred.extend_from_slice(&queries[..q * d]);
        let w = ix.projector.words_per_vector();
        self.bits.resize((m + q) * w, 0);
        ix.flip(&mut self.centred);
        ix.projector.sign_bits(&self.centred, &mut self.bits);
        for key_bits in self.bits[..m * w].chunks_exact(w) {
            self.codes.clear();
            for t in 0..ix.l {
                self.codes.push(table_code(key_bits, t, ix.k));
            }
            ix.push_codes(&self.codes).map_err(|e| e.to_string())?;
        }
        query_bits.extend_from_slice(&self.bits[m * w..]);
        Ok(())
    }

    /// Tokens stored.
    pub(crate) fn len(&self) -> usize {
        self.keys.rows()
    }

    /// Whether `knorm` is kept: only LSH reads it, and bf16 and int8 rows
    /// give their norms with their dot products instead.
    pub(crate) fn keeps_norms(&self) -> bool {
        self.index.is_some() && matches!(self.keys, Rows::F32(_))
    }
}

/// The offloaded KV cache of one (sequence, layer): all kv heads, bf16 or f32
/// rows ([`LayerConfig::kv_dtype`]).
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
                keys: Rows::keys(cfg.kv_dtype, cfg.head_dim),
                values: Rows::values(cfg.kv_dtype, cfg.head_dim),
                d: cfg.head_dim,
                mean: vec![0.0; cfg.head_dim],
                knorm: Vec::new(),
                index,
                centred: Vec::new(),
                bits: Vec::new(),
                codes: Vec::new(),
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

    /// The keys and values of kv head `h` as the store holds them, widened to
    /// f32 (int8 codes dequantized): `([n][head_dim], [n][head_dim])`.
    pub fn stored_rows(&self, h: usize) -> Result<(Vec<f32>, Vec<f32>), CpuError> {
        let head = self.head(h)?;
        let (n, d) = (head.len(), head.d);
        let (mut keys, mut values) = (vec![0.0; n * d], vec![0.0; n * d]);
        for (i, (k, v)) in keys
            .chunks_exact_mut(d.max(1))
            .zip(values.chunks_exact_mut(d.max(1)))
            .enumerate()
        {
            head.keys.row_f32(i, k);
            head.values.row_f32(i, v);
        }
        Ok((keys, values))
    }

    /// Bytes of K and V rows.
    pub fn kv_bytes(&self) -> usize {
        self.sum_over_heads(|h| h.keys.bytes() + h.values.bytes())
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
    /// (a blocked projection, then a counting sort per table). Rows are stored
    /// in the configured [`KvDtype`]. Returns how long the rows and the index
    /// took.
    pub fn load_prefill(
        &mut self,
        keys: &[bf16],
        values: &[bf16],
        threads: usize,
    ) -> Result<PrefillTimes, CpuError> {
        self.load_prefill_rows(keys, values, threads)
    }

    /// [`LayerStore::load_prefill`] from f32 rows (rounded to bf16 if the store
    /// holds bf16).
    pub fn load_prefill_f32(
        &mut self,
        keys: &[f32],
        values: &[f32],
        threads: usize,
    ) -> Result<PrefillTimes, CpuError> {
        self.load_prefill_rows(keys, values, threads)
    }

    fn load_prefill_rows<T: Elem>(
        &mut self,
        keys: &[T],
        values: &[T],
        threads: usize,
    ) -> Result<PrefillTimes, CpuError> {
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
        let n = keys.len() / (nh * d);
        if let Some((k, l)) = self.cfg.lsh {
            // Offsets are u32 counts of 12-bit units: one per entry, plus in
            // each bucket at most one escape per 4095 positions it spans.
            let escapes = (1usize << k).saturating_mul(n / 4095 + 1);
            if n.saturating_add(escapes).saturating_mul(l) >= u32::MAX as usize {
                return Err(CpuError::Shape(
                    "prefill too large for the index offsets".into(),
                ));
            }
            if n > MAX_INDEXED_KEYS {
                return Err(CpuError::Shape(format!(
                    "at most {MAX_INDEXED_KEYS} prefill tokens per indexed store"
                )));
            }
        }
        // Each thread copies its heads' rows (faulting in their pages), then,
        // once every row is in, builds their tables: two phases, timed apart.
        let threads = threads.max(1);
        let per = nh.div_ceil(threads);
        let mut heads: Vec<(usize, &mut HeadStore)> = self.heads_mut().enumerate().collect();
        let start = Instant::now();
        let copied = in_parallel(&mut heads, per, |h, head, _: &mut ()| {
            let key = |t: usize| &keys[(t * nh + h) * d..(t * nh + h + 1) * d];
            let value = |t: usize| &values[(t * nh + h) * d..(t * nh + h + 1) * d];
            if let Rows::I8(codes) = &mut head.keys {
                // int8 keys are quantized around the centring mean, so it is
                // fixed first, from the rows as given.
                head.mean = column_mean((0..n).map(key), d);
                codes.fix_range(&head.mean, true, (0..n).map(key));
            }
            if let Rows::I8(codes) = &mut head.values {
                let mean = column_mean((0..n).map(value), d);
                codes.fix_range(&mean, false, (0..n).map(value));
            }
            head.keys.reserve(n)?;
            head.values.reserve(n)?;
            for t in 0..n {
                let o = (t * nh + h) * d;
                head.keys.extend(&keys[o..o + d])?;
                head.values.extend(&values[o..o + d])?;
            }
            Ok(())
        });
        let rows_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let built = copied.and_then(|()| {
            in_parallel(&mut heads, per, |_, head, scratch| {
                build_head(head, n, d, scratch)
            })
        });
        let index_s = start.elapsed().as_secs_f64();
        if let Err(e) = built {
            // Leave the store empty rather than half-loaded.
            *self = LayerStore::new(self.cfg.clone())?;
            return Err(e);
        }
        Ok(PrefillTimes { rows_s, index_s })
    }

    /// Appends tokens (`keys`, `values`: `[n][n_kv_heads][head_dim]`), centred
    /// with the fixed prefill mean and inserted into every table.
    pub fn append(&self, keys: &[bf16], values: &[bf16]) -> Result<(), CpuError> {
        self.append_rows(keys, values)
    }

    /// [`LayerStore::append`] from f32 rows (rounded to bf16 if the store
    /// holds bf16).
    pub fn append_f32(&self, keys: &[f32], values: &[f32]) -> Result<(), CpuError> {
        self.append_rows(keys, values)
    }

    fn append_rows<T: Elem>(&self, keys: &[T], values: &[T]) -> Result<(), CpuError> {
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
                head.append(&k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d])
                    .map_err(CpuError::Shape)?;
            }
        }
        Ok(())
    }
}

/// Wall-clock times of [`LayerStore::load_prefill`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillTimes {
    /// Copying the rows into the store (and faulting in its pages), seconds.
    pub rows_s: f64,
    /// Building the LSH tables over them (centring, hashing, bucketing),
    /// seconds; 0 without tables.
    pub index_s: f64,
}

/// Runs `job(kv head, store, scratch)` for every head, `per` heads to a
/// thread, each thread with its own scratch; the first error (or a panic) is
/// the result.
fn in_parallel<S: Default>(
    heads: &mut [(usize, &mut HeadStore)],
    per: usize,
    job: impl Fn(usize, &mut HeadStore, &mut S) -> Result<(), OutOfMemory> + Sync,
) -> Result<(), CpuError> {
    std::thread::scope(|s| {
        let job = &job;
        let jobs: Vec<_> = heads
            .chunks_mut(per.max(1))
            .map(|chunk| {
                s.spawn(move || -> Result<(), OutOfMemory> {
                    let mut scratch = S::default();
                    for (h, head) in chunk.iter_mut() {
                        job(*h, head, &mut scratch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        // Join every job (an unjoined panicked one would panic the scope).
        let results: Vec<_> = jobs.into_iter().map(|job| job.join()).collect();
        results.into_iter().try_for_each(|r| match r {
            Ok(done) => done.map_err(CpuError::from),
            Err(_) => Err(CpuError::Worker("loading the store panicked".into())),
        })
    })
}

/// Buffers of [`build_head`], reused across the heads of one thread: the
/// codes of a 96k-token head take 29 MB, whose fresh pages cost more to
/// fault in than to fill.
#[derive(Default)]
struct BuildScratch {
    centred: Vec<f32>,
    bits: Vec<u64>,
    codes: Vec<u16>,
}

/// The mean of `d`-value rows (zeros for none), summed in f64.
fn column_mean<'r, T: Elem + 'r>(rows: impl Iterator<Item = &'r [T]>, d: usize) -> Vec<f32> {
    let mut sum = vec![0.0f64; d];
    let mut n = 0usize;
    for r in rows {
        for (s, x) in sum.iter_mut().zip(r) {
            *s += f64::from(x.to_f32());
        }
        n += 1;
    }
    sum.iter().map(|s| (s / n.max(1) as f64) as f32).collect()
}

fn build_head(
    head: &mut HeadStore,
    n: usize,
    d: usize,
    scratch: &mut BuildScratch,
) -> Result<(), OutOfMemory> {
    let mut row = vec![0.0f32; d];
    // int8 keys fixed their mean before they were quantized.
    if n > 0 && !matches!(head.keys, Rows::I8(_)) {
        let mut sum = vec![0.0f64; d];
        for t in 0..n {
            head.keys.row_f32(t, &mut row);
            for (s, x) in sum.iter_mut().zip(&row) {
                *s += f64::from(*x);
            }
        }
        head.mean = sum.iter().map(|s| (s / n as f64) as f32).collect();
    }
    const BLOCK: usize = 1024;
    let BuildScratch {
        centred,
        bits,
        codes,
    } = scratch;
    centred.resize(BLOCK * d, 0.0);
    let keeps_norms = head.keeps_norms();
    head.knorm = Vec::with_capacity(if keeps_norms { n } else { 0 });
    let Some(ix) = head.index.as_mut() else {
        return Ok(());
    };
    let (k, l) = (ix.k, ix.l);
    let w = ix.projector.words_per_vector();
    bits.resize(BLOCK * w, 0);
    codes.resize(n * l, 0); // table-major
    for b0 in (0..n).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(n);
        for (i, t) in (b0..b1).enumerate() {
            let dst = &mut centred[i * d..(i + 1) * d];
            head.keys.row_f32(t, dst);
            let mut s = 0.0f32;
            for (x, m) in dst.iter_mut().zip(&head.mean) {
                *x -= m;
                s += *x * *x;
            }
            if keeps_norms {
                head.knorm.push(f16::from_f32(s.sqrt()));
            }
        }
        let m = b1 - b0;
        ix.flip(&mut centred[..m * d]);
        ix.projector
            .sign_bits(&centred[..m * d], &mut bits[..m * w]);
        for t in 0..l {
            let dst = &mut codes[t * n + b0..t * n + b0 + m];
            for (i, c) in dst.iter_mut().enumerate() {
                *c = table_code(&bits[i * w..(i + 1) * w], t, k);
            }
        }
    }
    ix.bulk = match n {
        0 => None,
        _ => Some(Csr::build(&codes[..n * l], n, 0, k, l)?),
    };
    Ok(())
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
    fn keys_hashed_with_queries_get_the_codes_they_get_alone() {
        let (d, l) = (16, 20);
        let cfg = LayerConfig {
            n_kv_heads: 1,
            group: 3,
            head_dim: d,
            lsh: Some((6, l)),
            seed: 5,
            ..LayerConfig::default()
        };
        let mut rng = SplitMix64(8);
        let mut rows = |n: usize| -> Vec<bf16> {
            (0..n * d)
                .map(|_| bf16::from_f32(rng.next_u64() as i32 as f32 / 2e9))
                .collect()
        };
        let (prefill, keys, values) = (rows(50), rows(2), rows(2));
        let queries: Vec<f32> = rows(3).iter().map(|x| x.to_f32()).collect();
        let stores: Vec<LayerStore> = (0..2)
            .map(|_| {
                let mut st = LayerStore::new(cfg.clone()).expect("config");
                st.load_prefill(&prefill, &prefill, 1).expect("prefill");
                st
            })
            .collect();
        let (mut alone, mut with) = (
            stores[0].head(0).expect("head"),
            stores[1].head(0).expect("head"),
        );
        alone.append(&keys, &values).expect("append");
        let mut bits = Vec::new();
        with.append_hashing(&keys, &values, &queries, &mut bits)
            .expect("append");
        let (ia, iw) = (
            alone.index.as_ref().expect("index"),
            with.index.as_ref().expect("index"),
        );
        assert_eq!(ia.raw_codes.len(), 2 * l);
        assert_eq!(ia.raw_codes, iw.raw_codes);
        // And each key's codes are those of the key hashed alone.
        let w = iw.projector.words_per_vector();
        for (j, key) in keys.chunks_exact(d).enumerate() {
            let mut x: Vec<f32> = key
                .iter()
                .zip(&with.mean)
                .map(|(k, m)| k.to_f32() - m)
                .collect();
            iw.flip(&mut x);
            let mut b = vec![0u64; w];
            iw.projector.sign_bits(&x, &mut b);
            let codes: Vec<u16> = (0..l).map(|t| table_code(&b, t, 6)).collect();
            assert_eq!(&iw.raw_codes[j * l..(j + 1) * l], &codes[..], "key {j}");
        }
        // The queries' bits are those of the queries hashed alone.
        let mut flipped = queries.clone();
        iw.flip(&mut flipped);
        let mut want = vec![0u64; 3 * iw.projector.words_per_vector()];
        iw.projector.sign_bits(&flipped, &mut want);
        assert_eq!(bits, want);
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
