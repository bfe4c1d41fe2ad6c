//! Ascending id lists packed as 12-bit gaps: the bucket format of tandem's LSH
//! tables.
//!
//! A list is a run of 12-bit units, two units in three bytes (unit `u` is the
//! low 12 bits of the little-endian `u16` at byte `3u/2` when `u` is even, its
//! high 12 bits when `u` is odd). The ids are the running sums of the units,
//! except that a unit equal to [`ESCAPE`] (4095) adds to the sum without
//! ending an id: a gap `g` is written as `g / 4095` escapes and `g % 4095`.
//! At 96k keys and 1024 buckets a gap is ~1000 on average and needs an escape
//! once in ~60, so lists take ~1.5 bytes per id. [`GapWriter`] writes lists
//! and [`decode_gaps`] reads them: 16 units per step with AVX-512 VBMI, one at
//! a time elsewhere. [`count_pairs`] decodes many lists and counts their ids'
//! collisions in one call, without writing the ids out.

use crate::isa::Isa;

/// The unit that adds 4095 to the running sum without ending an id.
pub const ESCAPE: u32 = 0xFFF;

/// Appends lists of ids to one packed byte buffer.
#[derive(Debug, Default)]
pub struct GapWriter {
    bytes: Vec<u8>,
    units: usize,
}

impl GapWriter {
    /// A writer whose buffer has room for `units` units.
    pub fn with_capacity(units: usize) -> Self {
        GapWriter {
            bytes: Vec::with_capacity(units * 3 / 2 + 8),
            units: 0,
        }
    }

    /// Units written so far (the start of the next list).
    #[inline]
    pub fn units(&self) -> usize {
        self.units
    }

    #[inline]
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

    /// Appends `id`, which follows `prev` in its list (`id >= prev`; `prev` is 0
    /// for a list's first id).
    #[inline]
    pub fn push_id(&mut self, prev: u32, id: u32) {
        debug_assert!(id >= prev);
        let mut gap = id - prev;
        while gap >= ESCAPE {
            self.push(ESCAPE);
            gap -= ESCAPE;
        }
        self.push(gap);
    }

    /// The packed bytes, with spare zero bytes at the end so that a reader may
    /// load a few bytes past the last unit.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0; 4]);
        self.bytes.shrink_to_fit();
        self.bytes
    }
}

/// Unit `u` of `packed`, or `None` past its end.
#[inline(always)]
fn unit(packed: &[u8], u: usize) -> Option<u32> {
    let b = 3 * u / 2;
    let v = u32::from(*packed.get(b)?) | u32::from(*packed.get(b + 1)?) << 8;
    Some(if u.is_multiple_of(2) {
        v & 0xFFF
    } else {
        v >> 4
    })
}

/// Decodes the list in units `start..end` of `packed` into `out` (ids in
/// increasing order) and returns how many ids it wrote. Stops early, without
/// error, at the end of `out`, at the end of `packed`, or at an escape cut
/// short by `end`. A list of `m` units holds at most `m` ids. Auto-dispatch.
pub fn decode_gaps(packed: &[u8], start: usize, end: usize, out: &mut [u32]) -> usize {
    decode_gaps_with(Isa::detect(), packed, start, end, out)
}

/// [`decode_gaps`] with an explicit ISA (capped at what the CPU supports; the
/// AVX-512 path also needs VBMI, else it runs the scalar one).
pub fn decode_gaps_with(
    isa: Isa,
    packed: &[u8],
    start: usize,
    end: usize,
    out: &mut [u32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::effective(isa) == Isa::Avx512
        && crate::isa::has_avx512vbmi()
        && out.len() >= end.saturating_sub(start)
    {
        // SAFETY: the CPU supports AVX-512 F/BW and VBMI, and `out` has a
        // slot for every unit of the list.
        return unsafe { x86::decode_gaps_vbmi(packed, start, end, out) };
    }
    let _ = isa;
    decode_scalar(packed, start, end, 0, out)
}

/// One list of a [`count_pairs`] call: units `start..end` of the packed
/// buffer, and the query heads (bits 0..4) whose collision it records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// First unit.
    pub start: u32,
    /// One past the last unit.
    pub end: u32,
    /// Bit `h` for each head `h` (0..4) that collides with the list's ids.
    pub heads: u8,
}

/// For every bucket, counts one collision of its heads for each of its ids:
/// `pairs[base + id] = hash::pair_count(pairs[base + id], heads)`. Ids at or
/// past `pairs.len()` are skipped; a list cut short by the end of `packed`
/// counts the ids it holds. The lists are decoded in registers and never
/// written out, and each bucket's bytes are prefetched a few buckets ahead.
/// Auto-dispatch.
pub fn count_pairs(packed: &[u8], buckets: &[Bucket], base: usize, pairs: &mut [u8]) {
    count_pairs_with(Isa::detect(), packed, buckets, base, pairs)
}

/// [`count_pairs`] with an explicit ISA (capped at what the CPU supports; the
/// AVX-512 path also needs VBMI, else it runs the scalar one).
pub(crate) fn count_pairs_with(
    isa: Isa,
    packed: &[u8],
    buckets: &[Bucket],
    base: usize,
    pairs: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::effective(isa) == Isa::Avx512 && crate::isa::has_avx512vbmi() {
        // SAFETY: the CPU supports AVX-512 F/BW and VBMI.
        unsafe { x86::count_pairs_vbmi(packed, buckets, base, pairs) };
        return;
    }
    let _ = isa;
    for (i, b) in buckets.iter().enumerate() {
        if let Some(ahead) = buckets.get(i + PREFETCH_BUCKETS) {
            let (from, to) = (3 * ahead.start as usize / 2, 3 * ahead.end as usize / 2);
            if let Some(bytes) = packed.get(from..to.min(packed.len())) {
                crate::vector::prefetch(bytes);
            }
        }
        let once = crate::hash::spread_heads(b.heads);
        count_list(packed, b.start as usize, b.end as usize, base, once, pairs);
    }
}

/// How many buckets ahead of the one counted its bytes are prefetched.
const PREFETCH_BUCKETS: usize = 4;

/// Counts the ids of units `u..end`: two units from each three bytes while
/// four bytes can be read, then [`count_scalar`] for the rest.
fn count_list(packed: &[u8], mut u: usize, end: usize, base: usize, once: u8, pairs: &mut [u8]) {
    let mut prev = 0u32;
    let mut mark = |prev: u32| {
        if let Some(p) = base
            .checked_add(prev as usize)
            .and_then(|i| pairs.get_mut(i))
        {
            *p |= ((*p & once) << 1) | once;
        }
    };
    if u % 2 == 1 && u < end {
        let Some(x) = unit(packed, u) else { return };
        prev = x;
        if x != ESCAPE {
            mark(prev);
        }
        u += 1;
    }
    while u + 2 <= end {
        let b = 3 * u / 2;
        let Some(&[b0, b1, b2, _]) = packed.get(b..b + 4) else {
            break;
        };
        let w = u32::from_le_bytes([b0, b1, b2, 0]);
        for x in [w & 0xFFF, w >> 12] {
            prev = prev.wrapping_add(x);
            if x != ESCAPE {
                mark(prev);
            }
        }
        u += 2;
    }
    count_scalar(packed, u, end, prev, base, once, pairs);
}

/// The scalar counter, from unit `u` with running sum `prev`; `once` is the
/// heads' low counter bits.
fn count_scalar(
    packed: &[u8],
    mut u: usize,
    end: usize,
    mut prev: u32,
    base: usize,
    once: u8,
    pairs: &mut [u8],
) {
    while u < end {
        let Some(x) = unit(packed, u) else { break };
        prev = prev.wrapping_add(x);
        if x != ESCAPE {
            if let Some(p) = base
                .checked_add(prev as usize)
                .and_then(|i| pairs.get_mut(i))
            {
                *p |= ((*p & once) << 1) | once;
            }
        }
        u += 1;
    }
}

/// The scalar decoder, from unit `u` with running sum `prev` and `out` empty.
fn decode_scalar(packed: &[u8], mut u: usize, end: usize, mut prev: u32, out: &mut [u32]) -> usize {
    let mut n = 0;
    while u < end && n < out.len() {
        let Some(x) = unit(packed, u) else { break };
        prev = prev.wrapping_add(x);
        if x != ESCAPE {
            out[n] = prev;
            n += 1;
        }
        u += 1;
    }
    n
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Byte indices and shifts that put units `u..u+16` in the 16 dword lanes
    /// of a vector, for `u` even (`[0]`) and odd (`[1]`), relative to byte `3u/2`.
    struct Layout {
        bytes: [[u8; 64]; 2],
        shifts: [[u32; 16]; 2],
    }

    const fn layout() -> Layout {
        let mut bytes = [[0u8; 64]; 2];
        let mut shifts = [[0u32; 16]; 2];
        let mut parity = 0;
        while parity < 2 {
            let mut i = 0;
            while i < 16 {
                let u = parity + i;
                let offset = 3 * u / 2 - 3 * parity / 2;
                bytes[parity][4 * i] = offset as u8;
                bytes[parity][4 * i + 1] = offset as u8 + 1;
                shifts[parity][i] = if u % 2 == 1 { 4 } else { 0 };
                i += 1;
            }
            parity += 1;
        }
        Layout { bytes, shifts }
    }

    const LAYOUT: Layout = layout();

    /// The constants of a step, in registers.
    struct Steps {
        idx: [__m512i; 2],
        shifts: [__m512i; 2],
        low12: __m512i,
    }

    impl Steps {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        unsafe fn new() -> Steps {
            Steps {
                idx: [
                    _mm512_loadu_si512(LAYOUT.bytes[0].as_ptr() as *const __m512i),
                    _mm512_loadu_si512(LAYOUT.bytes[1].as_ptr() as *const __m512i),
                ],
                shifts: [
                    _mm512_loadu_si512(LAYOUT.shifts[0].as_ptr() as *const __m512i),
                    _mm512_loadu_si512(LAYOUT.shifts[1].as_ptr() as *const __m512i),
                ],
                low12: _mm512_set1_epi32(0xFFF),
            }
        }

        /// Decodes units `u..u + lanes` (`lanes = min(16, end - u)`, `u < end`):
        /// returns their ids, packed from lane 0, with how many there are and
        /// `lanes`, and advances the running sum `prev` (held in every lane).
        /// `None` if their bytes are not all in `packed`. Loads only the
        /// list's own bytes: a load reaching into the next cache line would
        /// wait on memory no one asked for.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        unsafe fn step(
            &self,
            packed: &[u8],
            u: usize,
            end: usize,
            prev: &mut __m512i,
        ) -> Option<(__m512i, usize, usize)> {
            let lanes = (end - u).min(16);
            let b0 = 3 * u / 2;
            // At most 26 bytes: units u..u+lanes end at byte ceil(3(u+lanes)/2).
            let need = (3 * (u + lanes)).div_ceil(2) - b0;
            if packed.len().checked_sub(b0)? < need {
                return None;
            }
            let src =
                _mm512_maskz_loadu_epi8((1u64 << need) - 1, packed.as_ptr().add(b0) as *const i8);
            // Bytes 0 and 1 of each dword from the source, bytes 2 and 3 zero.
            let odd = 0u16.wrapping_sub((u % 2) as u16);
            let index = _mm512_mask_blend_epi32(odd, self.idx[0], self.idx[1]);
            let shift = _mm512_mask_blend_epi32(odd, self.shifts[0], self.shifts[1]);
            let v = _mm512_maskz_permutexvar_epi8(0x3333_3333_3333_3333, index, src);
            let v = _mm512_and_si512(_mm512_srlv_epi32(v, shift), self.low12);
            let valid: u16 = if lanes >= 16 { !0 } else { (1u16 << lanes) - 1 };
            // Inclusive prefix sum of the units, plus the running sum: the
            // only value one step hands the next, so the steps overlap.
            let zero = _mm512_setzero_si512();
            let mut x = _mm512_maskz_mov_epi32(valid, v);
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<15>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<14>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<12>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<8>(x, zero));
            x = _mm512_add_epi32(x, *prev);
            *prev = _mm512_permutexvar_epi32(_mm512_set1_epi32(lanes as i32 - 1), x);
            // Escapes end no id: their lanes are squeezed out.
            let escapes = _mm512_mask_cmpeq_epi32_mask(valid, v, self.low12);
            let ids = valid & !escapes;
            let x = if escapes == 0 {
                x
            } else {
                _mm512_maskz_compress_epi32(ids, x)
            };
            Some((x, ids.count_ones() as usize, lanes))
        }
    }

    /// The running sum held in every lane of `prev`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn running_sum(prev: __m512i) -> u32 {
        _mm_cvtsi128_si32(_mm512_castsi512_si128(prev)) as u32
    }

    /// Safety: AVX-512F/BW and VBMI; `out.len() >= end - u`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn decode_gaps_vbmi(
        packed: &[u8],
        mut u: usize,
        end: usize,
        out: &mut [u32],
    ) -> usize {
        let steps = Steps::new();
        let mut prev = _mm512_setzero_si512();
        let mut n = 0usize;
        // Every unit has a slot in `out`, so the next step's units do not
        // wait on how many ids this one found: the loads run ahead.
        while u < end {
            let Some((x, count, lanes)) = steps.step(packed, u, end, &mut prev) else {
                // The list runs past `packed`: what is left of it, a unit at a time.
                let tail = &mut out[n..];
                return n + super::decode_scalar(packed, u, end, running_sum(prev), tail);
            };
            let keep: u16 = if count >= 16 { !0 } else { (1u16 << count) - 1 };
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(n) as *mut i32, keep, x);
            n += count;
            u += lanes;
        }
        n
    }

    /// Lanes `0..count - 1`: the lanes compared with their next.
    #[inline]
    fn valid_pairs(count: usize) -> u16 {
        if count >= 16 {
            0x7FFF
        } else {
            ((1u32 << count) - 1) as u16 >> 1
        }
    }

    /// Buckets ahead of the one being counted whose bytes are prefetched.
    const BUCKETS_AHEAD: usize = 4;

    /// Safety: AVX-512F/BW and VBMI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn count_pairs_vbmi(
        packed: &[u8],
        buckets: &[super::Bucket],
        base: usize,
        pairs: &mut [u8],
    ) {
        let steps = Steps::new();
        let mut lanes_out = [0u32; 16];
        for (i, b) in buckets.iter().enumerate() {
            if let Some(ahead) = buckets.get(i + BUCKETS_AHEAD) {
                let (s, e) = (
                    3 * ahead.start as usize / 2,
                    (3 * ahead.end as usize).div_ceil(2),
                );
                if let Some(bytes) = packed.get(s..e.min(packed.len())) {
                    crate::vector::prefetch(bytes);
                }
            }
            let once = crate::hash::spread_heads(b.heads);
            let (mut u, end) = (b.start as usize, b.end as usize);
            let mut prev = _mm512_setzero_si512();
            while u < end {
                let Some((x, count, lanes)) = steps.step(packed, u, end, &mut prev) else {
                    let sum = running_sum(prev);
                    super::count_scalar(packed, u, end, sum, base, once, pairs);
                    break;
                };
                _mm512_storeu_si512(lanes_out.as_mut_ptr() as *mut __m512i, x);
                let ids = &lanes_out[..count];
                match (ids.first(), ids.last()) {
                    // A step's ids ascend unless the running sum wrapped
                    // inside it, which leaves the last below the first. The
                    // dword at each id's byte must be inside `pairs`.
                    (Some(&lo), Some(&hi))
                        if lo <= hi
                            && hi < i32::MAX as u32
                            && _mm512_mask_cmpeq_epi32_mask(
                                valid_pairs(count),
                                x,
                                _mm512_alignr_epi32::<1>(x, x),
                            ) == 0
                            && base
                                .checked_add(hi as usize + 3)
                                .is_some_and(|m| m < pairs.len()) =>
                    {
                        // Each id's counter is the low byte of the dword at its
                        // byte. Dwords of nearby ids overlap, but a scatter
                        // writes its lanes in order and the ids strictly
                        // ascend (a repeated id takes the scalar path): each
                        // counter's last write is from its own lane, and a
                        // byte no lane counts gets back the value it had.
                        let valid = if count >= 16 {
                            !0u16
                        } else {
                            (1u16 << count) - 1
                        };
                        let at = pairs.as_mut_ptr().add(base);
                        let once32 = _mm512_set1_epi32(i32::from(once));
                        let old = _mm512_mask_i32gather_epi32::<1>(
                            _mm512_setzero_si512(),
                            valid,
                            x,
                            at as *const i32,
                        );
                        let counted = _mm512_or_si512(
                            _mm512_or_si512(old, once32),
                            _mm512_slli_epi32::<1>(_mm512_and_si512(old, once32)),
                        );
                        _mm512_mask_i32scatter_epi32::<1>(at as *mut i32, valid, x, counted);
                    }
                    _ => {
                        for &id in ids {
                            if let Some(p) =
                                base.checked_add(id as usize).and_then(|i| pairs.get_mut(i))
                            {
                                *p |= ((*p & once) << 1) | once;
                            }
                        }
                    }
                }
                u += lanes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Random ascending lists with small, large (escaped) and zero gaps; some
    /// start past 2^24 (thousands of escapes in a row).
    fn lists(rng: &mut SplitMix64, count: usize) -> Vec<Vec<u32>> {
        (0..count)
            .map(|c| {
                let len = (rng.next_u64() % (1 + 3 * c as u64 % 90)) as usize;
                let mut id = if c % 50 == 7 { 30_000_000 } else { 0u32 };
                (0..len)
                    .map(|_| {
                        id += match rng.next_u64() % 10 {
                            0 => 4095 + (rng.next_u64() % 20000) as u32,
                            1 => 0,
                            _ => (rng.next_u64() % 300) as u32,
                        };
                        id
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_isa_decodes_what_the_writer_wrote() {
        let mut rng = SplitMix64(9);
        let lists = lists(&mut rng, 300);
        let mut w = GapWriter::with_capacity(0);
        let mut spans = Vec::new();
        for list in &lists {
            let start = w.units();
            let mut prev = 0;
            for &id in list {
                w.push_id(prev, id);
                prev = id;
            }
            spans.push((start, w.units()));
        }
        let packed = w.finish();
        for isa in Isa::all_supported() {
            for (list, &(start, end)) in lists.iter().zip(&spans) {
                let mut out = vec![0u32; end - start + 3];
                let n = decode_gaps_with(isa, &packed, start, end, &mut out);
                assert_eq!(&out[..n], &list[..], "{isa:?} units {start}..{end}");
                // A short output stops at its end.
                if n > 1 {
                    let mut short = vec![0u32; n - 1];
                    let m = decode_gaps_with(isa, &packed, start, end, &mut short);
                    assert_eq!(&short[..m], &list[..n - 1], "{isa:?}");
                }
            }
        }
    }

    /// `count_pairs` by way of the scalar decoder and `hash::pair_count`.
    fn count_reference(packed: &[u8], buckets: &[Bucket], base: usize, pairs: &mut [u8]) {
        for b in buckets {
            let mut ids = vec![0u32; (b.end.saturating_sub(b.start)) as usize];
            let n = decode_scalar(packed, b.start as usize, b.end as usize, 0, &mut ids);
            for &id in &ids[..n] {
                if let Some(p) = pairs.get_mut(base + id as usize) {
                    *p = crate::hash::pair_count(*p, b.heads);
                }
            }
        }
    }

    #[test]
    fn every_isa_counts_pairs_as_decoding_then_counting_does() {
        let mut rng = SplitMix64(21);
        let mut lists = lists(&mut rng, 400);
        // Dense lists: neighbouring ids share the bytes of their counters.
        for len in [5u32, 16, 17, 40, 333] {
            let mut id = 0;
            lists.push(
                (0..len)
                    .map(|_| {
                        id += 1 + (rng.next_u64() % 3) as u32;
                        id
                    })
                    .collect(),
            );
        }
        let mut w = GapWriter::with_capacity(0);
        let mut buckets = Vec::new();
        for list in &lists {
            let start = w.units() as u32;
            let mut prev = 0;
            for &id in list {
                w.push_id(prev, id);
                prev = id;
            }
            let heads = (rng.next_u64() % 16) as u8;
            buckets.push(Bucket {
                start,
                end: w.units() as u32,
                heads,
            });
        }
        // The same lists again, so that counters reach two.
        buckets.extend(buckets.clone().iter().rev().map(|b| Bucket {
            heads: b.heads ^ 5,
            ..*b
        }));
        let packed = w.finish();
        // Short counters skip the large ids; a base shifts every id.
        for (len, base) in [(40_000_000usize, 0usize), (25_013, 3), (777, 0), (0, 0)] {
            let mut want = vec![0u8; len];
            count_reference(&packed, &buckets, base, &mut want);
            for isa in Isa::all_supported() {
                let mut got = vec![0u8; len];
                count_pairs_with(isa, &packed, &buckets, base, &mut got);
                assert!(got == want, "{isa:?} len {len} base {base}");
            }
        }
    }

    #[test]
    fn truncated_or_garbage_input_stops_without_panicking() {
        let mut rng = SplitMix64(4);
        for len in 0..80 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            for isa in Isa::all_supported() {
                let mut out = vec![0u32; 64];
                for (start, end) in [(0, 2 * len / 3 + 5), (1, len), (3, 40), (len, len + 9)] {
                    let n = decode_gaps_with(isa, &bytes, start, end, &mut out);
                    let mut reference = vec![0u32; 64];
                    let m = decode_scalar(&bytes, start, end, 0, &mut reference);
                    assert_eq!(
                        &out[..n],
                        &reference[..m],
                        "{isa:?} len {len} {start}..{end}"
                    );
                    let bucket = [Bucket {
                        start: start as u32,
                        end: end as u32,
                        heads: 0b1011,
                    }];
                    let (mut got, mut want) = (vec![0u8; 3000], vec![0u8; 3000]);
                    count_pairs_with(isa, &bytes, &bucket, usize::MAX - 5, &mut got);
                    count_pairs_with(isa, &bytes, &bucket, 7, &mut got);
                    count_reference(&bytes, &bucket, 7, &mut want);
                    assert!(got == want, "{isa:?} len {len} {start}..{end}");
                }
            }
        }
    }
}
