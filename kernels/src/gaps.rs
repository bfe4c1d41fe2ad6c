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
//! a time elsewhere.

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
    if isa.min(crate::vector::best_supported()) == Isa::Avx512
        && has_vbmi()
        && out.len() >= end.saturating_sub(start)
    {
        // SAFETY: the CPU supports AVX-512 F/BW and VBMI, and `out` has a
        // slot for every unit of the list.
        return unsafe { x86::decode_gaps_vbmi(packed, start, end, out) };
    }
    let _ = isa;
    decode_scalar(packed, start, end, 0, out)
}

#[cfg(target_arch = "x86_64")]
fn has_vbmi() -> bool {
    static VBMI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VBMI.get_or_init(|| is_x86_feature_detected!("avx512vbmi"))
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

    /// Safety: AVX-512F/BW and VBMI; `out.len() >= end - u`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn decode_gaps_vbmi(
        packed: &[u8],
        mut u: usize,
        end: usize,
        out: &mut [u32],
    ) -> usize {
        let idx = [
            _mm512_loadu_si512(LAYOUT.bytes[0].as_ptr() as *const __m512i),
            _mm512_loadu_si512(LAYOUT.bytes[1].as_ptr() as *const __m512i),
        ];
        let shifts = [
            _mm512_loadu_si512(LAYOUT.shifts[0].as_ptr() as *const __m512i),
            _mm512_loadu_si512(LAYOUT.shifts[1].as_ptr() as *const __m512i),
        ];
        let low12 = _mm512_set1_epi32(0xFFF);
        let zero = _mm512_setzero_si512();
        // The running sum, in every lane: the only value one step hands the
        // next, so the steps' prefix sums overlap.
        let mut prev = _mm512_setzero_si512();
        let mut n = 0usize;
        // Every unit has a slot in `out`, so the next step's units do not
        // wait on how many ids this one found: the loads run ahead.
        while u < end {
            let b0 = 3 * u / 2;
            if b0 >= packed.len() {
                break;
            }
            let lanes = (end - u).min(16);
            let avail = (packed.len() - b0).min(64);
            let parity = u % 2;
            let load_mask = if avail == 64 {
                !0u64
            } else {
                (1u64 << avail) - 1
            };
            let src = _mm512_maskz_loadu_epi8(load_mask, packed.as_ptr().add(b0) as *const i8);
            // Bytes 0 and 1 of each dword from the source, bytes 2 and 3 zero.
            // Registers, not the arrays' stack copies: the choice is a blend.
            let odd = 0u16.wrapping_sub(parity as u16);
            let index = _mm512_mask_blend_epi32(odd, idx[0], idx[1]);
            let shift = _mm512_mask_blend_epi32(odd, shifts[0], shifts[1]);
            let v = _mm512_maskz_permutexvar_epi8(0x3333_3333_3333_3333, index, src);
            let v = _mm512_and_si512(_mm512_srlv_epi32(v, shift), low12);
            // Lanes whose two bytes were not loaded are not units of the list.
            let in_bytes = if avail == 64 {
                lanes
            } else {
                (0..lanes)
                    .take_while(|&i| usize::from(LAYOUT.bytes[parity][4 * i]) + 2 <= avail)
                    .count()
            };
            let valid: u16 = if in_bytes >= 16 {
                !0
            } else {
                (1u16 << in_bytes) - 1
            };
            if in_bytes == 0 {
                break;
            }
            // Inclusive prefix sum of the units, plus the running sum.
            let mut x = _mm512_maskz_mov_epi32(valid, v);
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<15>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<14>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<12>(x, zero));
            x = _mm512_add_epi32(x, _mm512_alignr_epi32::<8>(x, zero));
            x = _mm512_add_epi32(x, prev);
            prev = _mm512_permutexvar_epi32(_mm512_set1_epi32(in_bytes as i32 - 1), x);
            // Escapes end no id: their lanes are squeezed out.
            let escapes = _mm512_mask_cmpeq_epi32_mask(valid, v, low12);
            let ids = valid & !escapes;
            let x = if escapes == 0 {
                x
            } else {
                _mm512_maskz_compress_epi32(ids, x)
            };
            let count = ids.count_ones() as usize;
            let keep: u16 = if count >= 16 { !0 } else { (1u16 << count) - 1 };
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(n) as *mut i32, keep, x);
            n += count;
            u += in_bytes;
        }
        n
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
                }
            }
        }
    }
}
