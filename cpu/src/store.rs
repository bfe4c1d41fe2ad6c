//! The offloaded KV store of one (sequence, layer): per kv head, the K and V
//! rows ([`crate::rows`]), the SimHash index over the keys
//! ([`crate::index`]) and the keys' per-block bounds ([`crate::bounds`]).
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

use crate::bounds::KeyBounds;
use crate::config::{KvDtype, LayerConfig};
use crate::error::CpuError;
use crate::index::{LshIndex, MAX_INDEXED_KEYS};
use crate::row_blocks::Elem;
use crate::rows::Rows;
use crate::sketch::KeySketch;
use crate::snapshot::{count, ArrayReader, ArrayWriter};
use half::{bf16, f16};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use tandem_kernels::mem::OutOfMemory;

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
    /// Per block of keys, the box holding them (the threshold policy's
    /// bounds). Always kept: it costs one read of the keys at a bulk load and
    /// `2d + 1` floats per 64 keys: 16 bytes a key at d = 128, 6% of bf16
    /// keys, 12% of int8 keys.
    pub(crate) bounds: KeyBounds,
    /// The keys' sketch, which finds LSH's safety sets, if the store was
    /// configured with one and its prefill load fitted it.
    pub(crate) sketch: Option<KeySketch>,
    /// Components of the sketch to fit at the prefill load (0: none).
    sketch_rank: usize,
    /// Reused buffers of [`HeadStore::append`]: centred keys (then the
    /// queries), their sign bits and one key's codes.
    centred: Vec<f32>,
    bits: Vec<u64>,
    codes: Vec<u16>,
}

impl HeadStore {
    fn new(cfg: &LayerConfig, kv_head: usize) -> Result<Self, CpuError> {
        let index = match cfg.lsh {
            Some(params) => Some(LshIndex::new(cfg, kv_head, params)?),
            None => None,
        };
        Ok(HeadStore {
            keys: Rows::keys(cfg.kv_dtype, cfg.head_dim),
            values: Rows::values(cfg.kv_dtype, cfg.head_dim),
            d: cfg.head_dim,
            mean: vec![0.0; cfg.head_dim],
            knorm: Vec::new(),
            index,
            bounds: KeyBounds::new(cfg.head_dim),
            sketch: None,
            sketch_rank: cfg.sketch,
            centred: Vec::new(),
            bits: Vec::new(),
            codes: Vec::new(),
        })
    }

    /// Holds this empty head's rows at `dtype` instead of its layer's.
    fn hold_at(&mut self, dtype: KvDtype) {
        debug_assert_eq!(self.len(), 0, "rows already held");
        self.keys = Rows::keys(dtype, self.d);
        self.values = Rows::values(dtype, self.d);
    }

    /// Appends key/value rows (`[n][head_dim]` each), centred with the fixed
    /// mean and hashed into every table.
    pub(crate) fn append<T: Elem>(&mut self, keys: &[T], values: &[T]) -> Result<(), CpuError> {
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
    ) -> Result<(), CpuError> {
        let d = self.d;
        if self.index.is_some() && self.len() + keys.len() / d > MAX_INDEXED_KEYS {
            return Err(CpuError::Shape(format!(
                "an indexed store holds at most {MAX_INDEXED_KEYS} tokens"
            )));
        }
        let first = self.len();
        self.keys.extend(keys)?;
        self.values.extend(values)?;
        let m = self.len() - first;
        self.bounds.extend(&self.keys);
        self.centre_keys(first, m);
        if let Some(sketch) = self.sketch.as_mut() {
            sketch.push(&self.centred[..m * d])?;
        }
        query_bits.clear();
        let Some(ix) = self.index.as_mut() else {
            return Ok(());
        };
        // The queries are hashed after the keys, in the same pass.
        let q = queries.len() / d;
        self.centred.extend_from_slice(&queries[..q * d]);
        let w = ix.projector.words_per_vector();
        self.bits.resize((m + q) * w, 0);
        ix.flip(&mut self.centred);
        ix.projector.sign_bits(&self.centred, &mut self.bits);
        for key_bits in self.bits[..m * w].chunks_exact(w) {
            ix.push_key(key_bits, &mut self.codes)?;
        }
        query_bits.extend_from_slice(&self.bits[m * w..]);
        Ok(())
    }

    /// Writes keys `first..first + m` centred into `centred`, as stored
    /// (rounded or quantized, as a bulk load hashes them), and their norms
    /// where they are kept.
    fn centre_keys(&mut self, first: usize, m: usize) {
        let d = self.d;
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
    }

    /// Writes the head's state: rows, centring mean, key norms, bounds,
    /// sketch and index.
    fn save(&self, out: &mut ArrayWriter) {
        out.put(&[self.len() as u64]);
        self.keys.save(out);
        self.values.save(out);
        out.put(&self.mean);
        out.put(&self.knorm);
        self.bounds.save(out);
        out.put(&[u64::from(self.sketch.is_some())]);
        if let Some(sketch) = &self.sketch {
            sketch.save(out);
        }
        if let Some(index) = &self.index {
            index.save(out);
        }
    }

    /// Loads the state [`HeadStore::save`] wrote into this empty head, of
    /// at most `max_keys` keys.
    fn load(&mut self, max_keys: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        let d = self.d;
        let n = count(
            "stored keys",
            input.get::<u64>("stored keys", 1)?[0],
            max_keys,
        )?;
        if self.index.is_some() && n > MAX_INDEXED_KEYS {
            return Err(CpuError::Snapshot(format!(
                "{n} keys, over the {MAX_INDEXED_KEYS} an indexed store holds"
            )));
        }
        self.keys.load(n, input)?;
        self.values.load(n, input)?;
        self.mean = input.get("key mean", d)?;
        let norms = if self.keeps_norms() { n } else { 0 };
        self.knorm = input.get("key norms", norms)?;
        self.bounds.load(n, input)?;
        let sketched = input.get::<u64>("sketch flag", 1)?[0];
        self.sketch = match (sketched, self.sketch_rank) {
            (0, _) => None,
            (1, r) if r > 0 => Some(KeySketch::load(d, r, n, input)?),
            _ => {
                return Err(CpuError::Snapshot(
                    "a key sketch the store does not keep".into(),
                ))
            }
        };
        let sketched = self.sketch.as_ref().map_or(n, KeySketch::len);
        if self.bounds.covered() != n || sketched != n {
            return Err(CpuError::Snapshot(format!(
                "{n} keys, but bounds of {} and a sketch of {sketched}",
                self.bounds.covered()
            )));
        }
        match self.index.as_mut() {
            Some(index) => index.load(n, input),
            None => Ok(()),
        }
    }

    /// Tokens stored.
    pub(crate) fn len(&self) -> usize {
        self.keys.rows()
    }

    /// Whether `knorm` is kept: only LSH reads it, and bf16 and int8 rows
    /// give their norms with their dot products instead.
    pub(crate) fn keeps_norms(&self) -> bool {
        self.index.is_some() && matches!(self.keys, Rows::F32(_) | Rows::PackedKeys(_))
    }

    /// Copies the prefill rows of this head (`keys`/`values` of every head,
    /// `[n][nh][d]`, this head `h`). int8 rows fix their ranges first.
    fn load_rows<T: Elem>(
        &mut self,
        h: usize,
        nh: usize,
        keys: &[T],
        values: &[T],
    ) -> Result<(), OutOfMemory> {
        let d = self.d;
        let n = keys.len() / (nh * d);
        let key = |t: usize| &keys[(t * nh + h) * d..(t * nh + h + 1) * d];
        let value = |t: usize| &values[(t * nh + h) * d..(t * nh + h + 1) * d];
        if self.keys.key_offset().is_some() {
            // Quantized keys are quantized around the centring mean, so it
            // is fixed first, from the rows as given.
            self.mean = column_mean((0..n).map(key), d);
            self.keys.fix_key_channels(d, &self.mean, (0..n).map(key));
        }
        if let Rows::I8(codes) = &mut self.values {
            let mean = column_mean((0..n).map(value), d);
            codes.channels.fix(d, &mean, false, (0..n).map(value));
        }
        self.keys.reserve(n)?;
        self.values.reserve(n)?;
        for t in 0..n {
            self.keys.extend(key(t))?;
            self.values.extend(value(t))?;
        }
        Ok(())
    }

    /// After [`HeadStore::load_rows`] of `n` rows: fixes the centring mean
    /// (unless int8 keys fixed it), the key norms and the bulk level of the
    /// index.
    fn build_index(&mut self, n: usize, scratch: &mut BuildScratch) -> Result<(), OutOfMemory> {
        let d = self.d;
        // Quantized keys fixed their mean before they were quantized.
        if n > 0 && self.keys.key_offset().is_none() {
            let mut row = vec![0.0f32; d];
            let mut sum = vec![0.0f64; d];
            for t in 0..n {
                self.keys.row_f32(t, &mut row);
                for (s, x) in sum.iter_mut().zip(&row) {
                    *s += f64::from(*x);
                }
            }
            self.mean = sum.iter().map(|s| (s / n as f64) as f32).collect();
        }
        let keeps_norms = self.keeps_norms();
        self.knorm = Vec::with_capacity(if keeps_norms { n } else { 0 });
        if self.sketch_rank > 0 {
            self.fit_sketch(n)?;
        }
        if self.index.is_none() {
            return Ok(());
        }
        for b0 in (0..n).step_by(BUILD_BLOCK) {
            self.hash_block(b0, (b0 + BUILD_BLOCK).min(n), n, scratch);
        }
        match self.index.as_mut() {
            Some(ix) => ix.load_bulk(&scratch.codes, n),
            None => Ok(()),
        }
    }

    /// Fits the key sketch to the `n` loaded keys, centred.
    fn fit_sketch(&mut self, n: usize) -> Result<(), OutOfMemory> {
        let d = self.d;
        let mut centred = Vec::new();
        centred
            .try_reserve_exact(n * d)
            .map_err(|_| OutOfMemory { bytes: n * d * 4 })?;
        centred.resize(n * d, 0.0);
        for (t, row) in centred.chunks_exact_mut(d).enumerate() {
            self.keys.row_f32(t, row);
            row.iter_mut().zip(&self.mean).for_each(|(x, m)| *x -= m);
        }
        self.sketch = KeySketch::fit(&centred, d, self.sketch_rank)?;
        Ok(())
    }

    /// Centres and hashes keys `b0..b1` of the `n` loaded, writing their
    /// table-major codes into `scratch.codes` (`[l][n]`).
    fn hash_block(&mut self, b0: usize, b1: usize, n: usize, scratch: &mut BuildScratch) {
        let d = self.d;
        let keeps_norms = self.keeps_norms();
        let Some(ix) = self.index.as_ref() else {
            return;
        };
        let l = ix.params.l;
        let w = ix.projector.words_per_vector();
        let BuildScratch {
            centred,
            bits,
            codes,
        } = scratch;
        centred.resize(BUILD_BLOCK * d, 0.0);
        bits.resize(BUILD_BLOCK * w, 0);
        codes.resize(n * l, 0);
        for (i, t) in (b0..b1).enumerate() {
            let dst = &mut centred[i * d..(i + 1) * d];
            self.keys.row_f32(t, dst);
            let mut s = 0.0f32;
            for (x, m) in dst.iter_mut().zip(&self.mean) {
                *x -= m;
                s += *x * *x;
            }
            if keeps_norms {
                self.knorm.push(f16::from_f32(s.sqrt()));
            }
        }
        let m = b1 - b0;
        ix.flip(&mut centred[..m * d]);
        ix.projector
            .sign_bits(&centred[..m * d], &mut bits[..m * w]);
        for t in 0..l {
            let dst = &mut codes[t * n + b0..t * n + b0 + m];
            for (i, c) in dst.iter_mut().enumerate() {
                *c = ix.code(&bits[i * w..(i + 1) * w], t);
            }
        }
    }
}

/// Keys centred and hashed at a time by a bulk load.
const BUILD_BLOCK: usize = 1024;

/// Buffers of [`HeadStore::build_index`], reused across the heads of one
/// thread: the codes of a 96k-token head take 29 MB, whose fresh pages cost
/// more to fault in than to fill.
#[derive(Default)]
struct BuildScratch {
    centred: Vec<f32>,
    bits: Vec<u64>,
    codes: Vec<u16>,
}

/// The mean of `d`-value rows (zeros for none), summed in f64.
/// The `count` kv heads (bits) of the prefill keys `[n][nh][d]` whose keys
/// have the least range × standard deviation over all their entries
/// (TurboAttention's order of the heads that int2 serves best), ties to
/// the lower head.
fn least_spread_heads<T: Elem>(keys: &[T], nh: usize, d: usize, count: usize) -> u64 {
    let mut spread: Vec<(f64, usize)> = (0..nh)
        .map(|h| {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            let (mut sum, mut squares, mut m) = (0.0f64, 0.0f64, 0usize);
            for row in keys.chunks_exact(d).skip(h).step_by(nh) {
                for &x in row {
                    let x = f64::from(x.to_f32());
                    if x.is_finite() {
                        (lo, hi) = (lo.min(x), hi.max(x));
                        (sum, squares, m) = (sum + x, squares + x * x, m + 1);
                    }
                }
            }
            let mean = sum / m.max(1) as f64;
            let std = (squares / m.max(1) as f64 - mean * mean).max(0.0).sqrt();
            let range = if m > 0 { hi - lo } else { 0.0 };
            (range * std, h)
        })
        .collect();
    spread.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    spread
        .iter()
        .take(count)
        .fold(0, |bits, &(_, h)| bits | 1 << h)
}

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

/// The offloaded KV cache of one (sequence, layer): all kv heads, rows of the
/// configured [`crate::KvDtype`].
///
/// Each kv head sits behind its own lock, so the worker attending one head can
/// append that head's evicted rows while other workers read other heads; share
/// the store between the pool and its owner as an `Arc<LayerStore>`.
pub struct LayerStore {
    cfg: LayerConfig,
    heads: Vec<Mutex<HeadStore>>,
    /// The kv heads (bits) held at int2 ([`crate::KvDtype::int2_heads`]).
    int2: u64,
}

/// Wall-clock times of [`LayerStore::load_prefill`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillTimes {
    /// Copying the rows into the store (and faulting in its pages), seconds.
    pub rows_s: f64,
    /// Building the LSH tables over them (centring, hashing, bucketing),
    /// seconds; 0 without tables.
    pub index_s: f64,
    /// Building the per-block key bounds of the threshold policy, seconds.
    pub bounds_s: f64,
}

impl LayerStore {
    /// An empty store.
    pub fn new(cfg: LayerConfig) -> Result<Self, CpuError> {
        cfg.validate()?;
        let heads = (0..cfg.n_kv_heads)
            .map(|h| HeadStore::new(&cfg, h).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(LayerStore {
            cfg,
            heads,
            int2: 0,
        })
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

    /// Holds the kv heads of `int2` (bits; all empty) at int2.
    fn hold_int2(&mut self, int2: u64) {
        for (h, head) in self.heads_mut().enumerate() {
            if (int2 >> h) & 1 == 1 {
                head.hold_at(KvDtype::INT2);
            }
        }
        self.int2 = int2;
    }

    /// The kv heads (bits) whose rows are held at int2 by
    /// [`crate::KvDtype::int2_heads`] (none before the prefill load).
    pub fn int2_heads(&self) -> u64 {
        self.int2
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

    /// Bytes of the index: tables, decode-time codes, key norms, means and
    /// the per-block key bounds.
    pub fn index_bytes(&self) -> usize {
        self.sum_over_heads(|h| {
            h.index.as_ref().map_or(0, LshIndex::bytes)
                + h.knorm.len() * 2
                + h.mean.len() * 4
                + h.bounds.bytes()
                + h.sketch.as_ref().map_or(0, KeySketch::bytes)
        })
    }

    /// Writes the store's state (every kv head's rows as stored, centring
    /// mean, key norms, index, bounds and sketch) for [`LayerStore::load`].
    pub fn save(&self, out: &mut ArrayWriter) -> Result<(), CpuError> {
        if self.cfg.kv_dtype.int2_heads > 0 {
            out.put(&[self.int2]);
        }
        for h in 0..self.heads.len() {
            self.head(h)?.save(out);
        }
        Ok(())
    }

    /// A store of `cfg` holding the state [`LayerStore::save`] wrote, of at
    /// most `max_keys` tokens; every array is checked against `cfg` before
    /// it is copied in.
    pub fn load(
        cfg: LayerConfig,
        max_keys: usize,
        input: &mut ArrayReader,
    ) -> Result<LayerStore, CpuError> {
        let mut store = LayerStore::new(cfg)?;
        if store.cfg.kv_dtype.int2_heads > 0 {
            let int2 = input.get::<u64>("int2 heads", 1)?[0];
            let held = int2.count_ones();
            let nh = store.heads.len() as u32;
            let want = u32::from(store.cfg.kv_dtype.int2_heads);
            if (held != 0 && held != want) || int2.checked_shr(nh).unwrap_or(0) != 0 {
                return Err(CpuError::Snapshot(format!(
                    "int2 heads {int2:#x}: {want} of {nh} kv heads configured"
                )));
            }
            store.hold_int2(int2);
        }
        for head in store.heads_mut() {
            head.load(max_keys, input)?;
        }
        let n = store.len();
        if (0..store.heads.len()).any(|h| store.head(h).map_or(true, |g| g.len() != n)) {
            return Err(CpuError::Snapshot(
                "kv heads holding different numbers of keys".into(),
            ));
        }
        Ok(store)
    }

    /// Bulk-loads the prompt keys and values after prefill: `keys` and `values`
    /// are `[n_tokens][n_kv_heads][head_dim]`. Must be called on an empty store.
    /// Fixes the centring mean and builds the LSH tables with `threads` threads
    /// (a blocked projection, then a counting sort per table), then the
    /// per-block key bounds. Rows are stored
    /// in the configured [`crate::KvDtype`]. Returns how long the rows and the
    /// index took.
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
        let n = self.check_prefill(keys.len(), values.len())?;
        let nh = self.cfg.n_kv_heads;
        let int2 = usize::from(self.cfg.kv_dtype.int2_heads);
        if int2 > 0 {
            self.hold_int2(least_spread_heads(keys, nh, self.cfg.head_dim, int2));
        }
        // Each thread copies its heads' rows (faulting in their pages), then,
        // once every row is in, builds their tables: two phases, timed apart.
        let per = nh.div_ceil(threads.max(1));
        let mut heads: Vec<(usize, &mut HeadStore)> = self.heads_mut().enumerate().collect();
        let start = Instant::now();
        let copied = in_parallel(&mut heads, per, |h, head, _: &mut ()| {
            head.load_rows(h, nh, keys, values)
        });
        let rows_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let built = copied.and_then(|()| {
            in_parallel(&mut heads, per, |_, head, scratch| {
                head.build_index(n, scratch)
            })
        });
        let index_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let bounded = built.and_then(|()| {
            in_parallel(&mut heads, per, |_, head, _: &mut ()| {
                head.bounds.extend(&head.keys);
                Ok(())
            })
        });
        let bounds_s = start.elapsed().as_secs_f64();
        if let Err(e) = bounded {
            // Leave the store empty rather than half-loaded.
            *self = LayerStore::new(self.cfg.clone())?;
            return Err(e);
        }
        Ok(PrefillTimes {
            rows_s,
            index_s,
            bounds_s,
        })
    }

    /// The number of prefill tokens in `keys`/`values` values, if this empty
    /// store can take them.
    fn check_prefill(&self, keys: usize, values: usize) -> Result<usize, CpuError> {
        let (nh, d) = (self.cfg.n_kv_heads, self.cfg.head_dim);
        if keys != values || !keys.is_multiple_of(nh * d) {
            return Err(CpuError::Shape(format!(
                "keys {keys} / values {values} not a multiple of n_kv_heads*head_dim = {}",
                nh * d
            )));
        }
        if !self.is_empty() {
            return Err(CpuError::Config("load_prefill on a non-empty store".into()));
        }
        let n = keys / (nh * d);
        if let Some(p) = self.cfg.lsh {
            // Offsets are u32 counts of 12-bit units: one per entry, plus in
            // each bucket at most one escape per 4095 positions it spans.
            let escapes = (1usize << p.k).saturating_mul(n / 4095 + 1);
            if n.saturating_add(escapes).saturating_mul(p.l) >= u32::MAX as usize {
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
        Ok(n)
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
                head.append(&k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d])?;
            }
        }
        Ok(())
    }
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

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
