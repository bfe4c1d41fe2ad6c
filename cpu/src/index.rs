//! The SimHash LSH index of one kv head's keys.
//!
//! Three levels, each covering a contiguous range of key ids:
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
//! triggers it). An index holds at most 2^24 - 1 keys.
//!
//! Hyperplanes: one set of Gaussian planes per seed, shared by every layer and
//! kv head of the process; each (layer, kv head) flips the signs of its input
//! dimensions with its own seeded +-1 vector, so its planes are still exactly
//! Gaussian and differ from every other head's.

use crate::config::{LayerConfig, LshIndexParams};
use crate::error::CpuError;
use crate::estimator::LnUTable;
use crate::shared::{shared, SharedCache};
use crate::snapshot::{count, ArrayReader, ArrayWriter};
use std::sync::{Arc, OnceLock};
use tandem_kernels::gaps::{count_pairs, decode_gaps, Bucket, GapWriter};
use tandem_kernels::hash::{table_code, Projector};
use tandem_kernels::mem::{HugeBuf, OutOfMemory, Plain};
use tandem_kernels::rng::SplitMix64;

/// Tokens an indexed store holds at most, so that the tables' u32 offsets
/// (12-bit units, a little over one per entry) stay far from overflowing as
/// it grows.
pub(crate) const MAX_INDEXED_KEYS: usize = (1 << 24) - 1;
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
        Projector::new(dim, n_planes, &planes).map_err(CpuError::from)
    })
}

/// `v` copied into huge pages: a retrieval reads a few lines of each of
/// hundreds of buckets spread over a level's tens of megabytes, and in 4 KB
/// pages nearly each of them needs a page walk.
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

    /// Writes each key's code into `codes`, table-major over `n` keys
    /// (`codes[t * n + key]`), the inverse of [`Csr::build`].
    fn codes_into(&self, k: usize, l: usize, n: usize, codes: &mut [u16]) {
        let mut ids = Vec::new();
        for t in 0..l {
            for c in 0..1usize << k {
                let (u, end) = self.bucket(t, c);
                for &id in self.decode_units(u, end, &mut ids) {
                    if let Some(code) = codes.get_mut(t * n + self.base as usize + id as usize) {
                        *code = c as u16;
                    }
                }
            }
        }
    }
}

/// The index of one kv head: its hyperplanes, its three levels and the
/// estimator's `ln u` table, all for the store's [`LshIndexParams`].
pub(crate) struct LshIndex {
    /// K, L and the collision threshold t: retrieval and `ln_u` both follow
    /// these.
    pub(crate) params: LshIndexParams,
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
    /// `ln u` over cos for `params`, the estimator's logit correction.
    pub(crate) ln_u: Arc<LnUTable>,
}

impl LshIndex {
    /// An empty index of kv head `kv_head` of a store configured by `cfg`.
    pub(crate) fn new(
        cfg: &LayerConfig,
        kv_head: usize,
        params: LshIndexParams,
    ) -> Result<Self, CpuError> {
        let d = cfg.head_dim;
        let projector = shared_projector(cfg.seed, d, params.k * params.l)?;
        let mut rng = SplitMix64(
            cfg.seed ^ (u64::from(cfg.layer) << 32) ^ (kv_head as u64).wrapping_mul(0x1000_0001),
        );
        let signs = (0..d)
            .map(|_| if rng.next_u64() & 1 == 1 { -1.0 } else { 1.0 })
            .collect();
        Ok(LshIndex {
            params,
            projector,
            signs,
            bulk: None,
            mid: None,
            raw_codes: Vec::new(),
            ln_u: LnUTable::shared(params),
        })
    }

    /// The code of table `table` for a vector with sign bits `bits`.
    #[inline(always)]
    pub(crate) fn code(&self, bits: &[u64], table: usize) -> u16 {
        table_code(bits, table, self.params.k)
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
        let (k, l) = (self.params.k, self.params.l);
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
        let raw = Csr::build(&tm, m, base, k, l)?;
        let mid = match &self.mid {
            Some(mid) => Csr::merge(mid, &raw, k, l)?,
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
                (Some(bulk), Some(mid)) => Some(Csr::merge(bulk, mid, k, l)?),
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

    /// Sets the bulk level from the table-major codes of keys `0..n`
    /// (`codes[t * n + i]` is key `i`'s code in table `t`).
    pub(crate) fn load_bulk(&mut self, codes: &[u16], n: usize) -> Result<(), OutOfMemory> {
        let (k, l) = (self.params.k, self.params.l);
        self.bulk = match n {
            0 => None,
            _ => Some(Csr::build(&codes[..n * l], n, 0, k, l)?),
        };
        Ok(())
    }

    /// Adds the codes of one appended key with sign bits `bits`, using
    /// `codes` as a buffer.
    pub(crate) fn push_key(
        &mut self,
        bits: &[u64],
        codes: &mut Vec<u16>,
    ) -> Result<(), OutOfMemory> {
        codes.clear();
        codes.extend((0..self.params.l).map(|t| self.code(bits, t)));
        self.push_codes(codes)
    }

    /// Writes the levels as their keys' codes (a level is a function of
    /// its keys' codes, so [`LshIndex::load`] rebuilds it exactly), then the
    /// raw codes.
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        let (k, l) = (self.params.k, self.params.l);
        let levels = [&self.bulk, &self.mid].map(|c| c.as_ref().map_or(0, |c| c.n));
        out.put(&levels.map(|n| n as u64));
        let n = self.n_bucketed();
        let mut codes = vec![0u16; n * l];
        for level in self.levels() {
            level.codes_into(k, l, n, &mut codes);
        }
        out.put(&codes);
        out.put(&self.raw_codes);
    }

    /// Replaces this (empty) index by the one [`LshIndex::save`] wrote over
    /// `n_keys` keys.
    pub(crate) fn load(&mut self, n_keys: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        let (k, l) = (self.params.k, self.params.l);
        let levels = input.get::<u64>("index levels", 2)?;
        let n_bulk = count("keys in the bulk level", levels[0], n_keys)?;
        let n_mid = count("keys in the mid level", levels[1], n_keys - n_bulk)?;
        let n = n_bulk + n_mid;
        let codes: Vec<u16> = input.get("index codes", n * l)?;
        let raw_codes: Vec<u16> = input.get("raw index codes", (n_keys - n) * l)?;
        if codes
            .iter()
            .chain(&raw_codes)
            .any(|&c| usize::from(c) >> k != 0)
        {
            return Err(CpuError::Snapshot(format!(
                "an index code of over {k} bits"
            )));
        }
        // Level `[first, last)` of the table-major codes, its own table-major codes.
        let level = |first: usize, last: usize| -> Result<Option<Csr>, CpuError> {
            if first == last {
                return Ok(None);
            }
            let m = last - first;
            let mut own = Vec::with_capacity(m * l);
            for t in 0..l {
                own.extend_from_slice(&codes[t * n + first..t * n + last]);
            }
            Ok(Some(Csr::build(&own, m, first as u32, k, l)?))
        };
        self.bulk = level(0, n_bulk)?;
        self.mid = level(n_bulk, n)?;
        self.raw_codes = raw_codes;
        Ok(())
    }

    /// Bytes of the levels and raw codes.
    pub(crate) fn bytes(&self) -> usize {
        self.levels().map(Csr::bytes).sum::<usize>() + self.raw_codes.len() * 2
    }
}
