//! (key bits, value bits) pairs: their names (`8/4` on the command line,
//! `K8V4` in tables), their policy strings, and which ones the offloaded
//! store supports under a base policy. A pair may hold some of a layer's kv
//! heads at int2 instead (TurboAttention's head-wise precision,
//! `int2_heads`), so that a layer's bits step by heads, not by whole pairs.

use std::fmt;
use std::str::FromStr;

use tandem_cpu::KvDtype;
use tandem_runtime::policy::{LayerAttention, LayerPolicy};

use crate::calibrate::CalibrateError;

/// Bit widths a pair may name; the store decides which combinations it holds.
pub const BIT_WIDTHS: [u8; 5] = [2, 4, 8, 16, 32];

/// KVTuner's candidate set, {2, 4, 8}², keys first.
pub const DEFAULT_PAIRS: &str = "8/8,8/4,8/2,4/8,4/4,4/2,2/8,2/4,2/2";

/// One layer's key and value bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BitPair {
    /// Bits per offloaded key element.
    pub key: u8,
    /// Bits per offloaded value element.
    pub value: u8,
    /// kv heads of the layer held at int2 keys and values instead (those of
    /// least key range × std, chosen at the prefill).
    pub int2_heads: u8,
}

/// Bits of a key and a value element of an int2 head.
const INT2_BIT_SUM: usize = 4;

impl BitPair {
    /// `key` and `value` bits in every kv head.
    pub const fn new(key: u8, value: u8) -> BitPair {
        BitPair {
            key,
            value,
            int2_heads: 0,
        }
    }

    /// This pair with `heads` kv heads at int2.
    pub const fn with_int2_heads(self, heads: u8) -> BitPair {
        BitPair {
            int2_heads: heads,
            ..self
        }
    }

    /// `K + V` summed over a layer's `heads` kv heads: twice the pair's mean
    /// bits times the heads, the unit the search counts in. `int2_heads` is
    /// at most `heads` ([`crate::calibrate::int2_variants`]).
    pub fn units(self, heads: usize) -> usize {
        let int2 = usize::from(self.int2_heads).min(heads);
        let wide = usize::from(self.key) + usize::from(self.value);
        (heads - int2) * wide + int2 * INT2_BIT_SUM
    }

    /// The mean bits of a key and a value element over a layer of `heads`
    /// kv heads: `(K + V) / 2`, less where heads are at int2.
    pub fn mean_bits(self, heads: usize) -> f64 {
        self.units(heads) as f64 / (2 * heads.max(1)) as f64
    }

    /// `base` with this pair's storage: `base,kbits=K,vbits=V` (or
    /// `base:kbits=K,vbits=V` when `base` has no parameters), and
    /// `,int2_heads=N` where heads are at int2.
    pub fn policy_string(self, base: &str) -> String {
        let joint = if base.contains(':') { ',' } else { ':' };
        let int2 = match self.int2_heads {
            0 => String::new(),
            n => format!(",int2_heads={n}"),
        };
        format!("{base}{joint}kbits={},vbits={}{int2}", self.key, self.value)
    }

    /// The store `base` gets with this pair, or why it has none.
    pub fn kv_dtype(self, base: &str) -> Result<KvDtype, String> {
        let layer = LayerPolicy::parse(&self.policy_string(base)).map_err(|e| e.to_string())?;
        match layer.attention {
            LayerAttention::Offloaded { kv_dtype, .. } => Ok(kv_dtype),
            _ => Err(format!("{base:?} does not offload, so it has no store")),
        }
    }
}

/// `K8V4`, or `K8V4+1×K2V2` with one kv head at int2.
impl fmt::Display for BitPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K{}V{}", self.key, self.value)?;
        match self.int2_heads {
            0 => Ok(()),
            n => write!(f, "+{n}×K2V2"),
        }
    }
}

/// `8/4` (key bits / value bits), each in [`BIT_WIDTHS`].
impl FromStr for BitPair {
    type Err = CalibrateError;

    fn from_str(s: &str) -> Result<Self, CalibrateError> {
        let bad = || CalibrateError::Pair(s.to_string());
        let (k, v) = s.trim().split_once('/').ok_or_else(bad)?;
        let width = |t: &str| {
            t.trim()
                .parse::<u8>()
                .ok()
                .filter(|b| BIT_WIDTHS.contains(b))
                .ok_or_else(bad)
        };
        Ok(BitPair::new(width(k)?, width(v)?))
    }
}

/// Parses a comma-separated list of pairs (`8/8,8/4`); a pair given twice is
/// an error.
pub fn parse_pairs(list: &str) -> Result<Vec<BitPair>, CalibrateError> {
    let mut pairs: Vec<BitPair> = Vec::new();
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        let pair: BitPair = part.parse()?;
        if pairs.contains(&pair) {
            return Err(CalibrateError::Pair(format!("{part} (given twice)")));
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        return Err(CalibrateError::Pair(list.to_string()));
    }
    Ok(pairs)
}

/// A candidate pair the store does not hold, with the policy parser's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedPair {
    /// The pair.
    pub pair: BitPair,
    /// Why its policy string does not parse.
    pub reason: String,
}

/// Splits `candidates` into the pairs whose policy strings parse under
/// `base` and the ones skipped, in the given order.
pub fn supported_pairs(base: &str, candidates: &[BitPair]) -> (Vec<BitPair>, Vec<SkippedPair>) {
    let mut supported = Vec::new();
    let mut skipped = Vec::new();
    for &pair in candidates {
        match pair.kv_dtype(base) {
            Ok(_) => supported.push(pair),
            Err(reason) => skipped.push(SkippedPair { pair, reason }),
        }
    }
    (supported, skipped)
}

/// Every pair of [`BIT_WIDTHS`] the store holds under `base` today.
pub fn every_supported_pair(base: &str) -> Vec<BitPair> {
    let all: Vec<BitPair> = BIT_WIDTHS
        .iter()
        .flat_map(|&key| {
            BIT_WIDTHS
                .iter()
                .map(move |&value| BitPair::new(key, value))
        })
        .collect();
    supported_pairs(base, &all).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_print_and_refuse_unknown_widths() {
        let p: BitPair = "8/4".parse().expect("pair");
        assert_eq!(p, BitPair::new(8, 4));
        assert_eq!(p.to_string(), "K8V4");
        assert_eq!(p.mean_bits(3), 6.0);
        assert_eq!(p.units(3), 36);
        assert_eq!(parse_pairs(DEFAULT_PAIRS).expect("default").len(), 9);
        for bad in ["3/4", "8", "8/", "x/4", "8/4/2", "8/64", ""] {
            assert!(parse_pairs(bad).is_err(), "{bad}");
        }
        assert!(parse_pairs("8/8,8/8").is_err());
    }

    #[test]
    fn policy_strings_join_the_base_with_the_right_separator() {
        let p = BitPair::new(8, 8);
        assert_eq!(p.policy_string("topk:k=8"), "topk:k=8,kbits=8,vbits=8");
        assert_eq!(p.policy_string("dense"), "dense:kbits=8,vbits=8");
    }

    #[test]
    fn int2_heads_lower_the_bits_by_heads_and_reach_the_store() {
        let p = BitPair::new(4, 4).with_int2_heads(1);
        assert_eq!(p.to_string(), "K4V4+1×K2V2");
        // Two heads of 4 + 4 bits and one of 2 + 2: 20 units, 10/3 mean bits.
        assert_eq!(p.units(3), 20);
        assert!((p.mean_bits(3) - 10.0 / 3.0).abs() < 1e-12);
        assert_eq!(p.mean_bits(8), (7.0 * 8.0 + 4.0) / 16.0);
        let base = "lsh:k=10,l=75";
        assert_eq!(
            p.policy_string(base),
            "lsh:k=10,l=75,kbits=4,vbits=4,int2_heads=1"
        );
        let dtype = p.kv_dtype(base).expect("held");
        assert_eq!(dtype.int2_heads, 1);
        assert_eq!(
            dtype,
            BitPair::new(4, 4)
                .kv_dtype(base)
                .expect("held")
                .with_int2_heads(1)
        );
    }

    #[test]
    fn the_supported_pairs_are_those_the_parser_accepts() {
        let base = "topk:k=8";
        let supported = every_supported_pair(base);
        for pair in [BitPair::new(8, 8), BitPair::new(16, 16)] {
            assert!(supported.contains(&pair), "{pair}");
        }
        for &pair in &supported {
            assert!(pair.kv_dtype(base).is_ok(), "{pair}");
        }
        let (_, skipped) = supported_pairs(base, &parse_pairs(DEFAULT_PAIRS).expect("pairs"));
        for s in &skipped {
            assert!(!supported.contains(&s.pair), "{}", s.pair);
            assert!(!s.reason.is_empty());
        }
        let (none, skipped) = supported_pairs("dense", &supported);
        assert!(none.is_empty(), "dense stays on the device");
        assert_eq!(skipped.len(), supported.len());
    }
}
