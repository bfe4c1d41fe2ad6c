//! (key bits, value bits) pairs: their names (`8/4` on the command line,
//! `K8V4` in tables), their policy strings, and which ones the offloaded
//! store supports under a base policy.

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
}

impl BitPair {
    /// `key + value`: twice the pair's mean bits, the unit the search counts in.
    pub fn bit_sum(self) -> usize {
        usize::from(self.key) + usize::from(self.value)
    }

    /// The mean bits of a key and a value element, `(K + V) / 2`.
    pub fn mean_bits(self) -> f64 {
        self.bit_sum() as f64 / 2.0
    }

    /// `base` with this pair's storage: `base,kbits=K,vbits=V` (or
    /// `base:kbits=K,vbits=V` when `base` has no parameters).
    pub fn policy_string(self, base: &str) -> String {
        let joint = if base.contains(':') { ',' } else { ':' };
        format!("{base}{joint}kbits={},vbits={}", self.key, self.value)
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

/// `K8V4`.
impl fmt::Display for BitPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K{}V{}", self.key, self.value)
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
        Ok(BitPair {
            key: width(k)?,
            value: width(v)?,
        })
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
        .flat_map(|&key| BIT_WIDTHS.iter().map(move |&value| BitPair { key, value }))
        .collect();
    supported_pairs(base, &all).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_print_and_refuse_unknown_widths() {
        let p: BitPair = "8/4".parse().expect("pair");
        assert_eq!(p, BitPair { key: 8, value: 4 });
        assert_eq!(p.to_string(), "K8V4");
        assert_eq!(p.mean_bits(), 6.0);
        assert_eq!(parse_pairs(DEFAULT_PAIRS).expect("default").len(), 9);
        for bad in ["3/4", "8", "8/", "x/4", "8/4/2", "8/64", ""] {
            assert!(parse_pairs(bad).is_err(), "{bad}");
        }
        assert!(parse_pairs("8/8,8/8").is_err());
    }

    #[test]
    fn policy_strings_join_the_base_with_the_right_separator() {
        let p = BitPair { key: 8, value: 8 };
        assert_eq!(p.policy_string("topk:k=8"), "topk:k=8,kbits=8,vbits=8");
        assert_eq!(p.policy_string("dense"), "dense:kbits=8,vbits=8");
    }

    #[test]
    fn the_supported_pairs_are_those_the_parser_accepts() {
        let base = "topk:k=8";
        let supported = every_supported_pair(base);
        for pair in [BitPair { key: 8, value: 8 }, BitPair { key: 16, value: 16 }] {
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
