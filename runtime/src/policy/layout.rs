//! MixAttention's named layouts: which layers are global, which attend a
//! sliding window, and which reuse another layer's keys and values, scaled
//! to any layer count by repeating a block of six layers.
//!
//! - `ma-pairs` (MixAttention's best): in each block of six, layer 0 is
//!   global and sliding layers share a cache in a pair {1, 2} and a triple
//!   {3, 4, 5}; the global layer of every odd block reuses the cache of the
//!   global layer of the block before it (on 24 layers: G0, {1,2}{3,4,5},
//!   G6←0, {7,8}{9,10,11}, G12, ..., G18←12, ...).
//! - `ma-offset`: the global layer is the last of each block (5, 11, 17, ...),
//!   every one reusing layer 5's cache; sliding layers share in a pair {0, 1}
//!   and a triple {2, 3, 4}.
//! - `one-in-six` (Character.AI's recipe): one global layer in six (0, 6,
//!   12, ...), all reusing layer 0's cache; sliding layers share in a pair and
//!   a triple as in `ma-pairs`.
//!
//! On a model not trained this way, a layout is an approximation to measure.

use std::str::FromStr;

use crate::error::{Error, Result};

/// One layer's part in a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Attends the whole context with its own cache (the table's policy).
    Global,
    /// Attends the whole context with layer `from`'s cache.
    GlobalShared { from: usize },
    /// Attends a sliding window with its own cache.
    Sliding,
    /// Attends a sliding window with layer `from`'s cache.
    SlidingShared { from: usize },
}

/// A named MixAttention layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// MixAttention's MA-Pairs.
    MaPairs,
    /// MixAttention's MA-Offset.
    MaOffset,
    /// Character.AI's one global layer in six, global caches tied.
    OneInSix,
}

impl FromStr for Layout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Layout> {
        match s.trim() {
            "ma-pairs" => Ok(Layout::MaPairs),
            "ma-offset" => Ok(Layout::MaOffset),
            "one-in-six" => Ok(Layout::OneInSix),
            other => Err(Error::InvalidRequest(format!(
                "unknown layout {other:?} (known: ma-pairs, ma-offset, one-in-six)"
            ))),
        }
    }
}

impl Layout {
    /// Every layer's role on a model of `n_layers` layers.
    pub fn roles(self, n_layers: usize) -> Vec<Role> {
        (0..n_layers).map(|i| self.role(i)).collect()
    }

    fn role(self, layer: usize) -> Role {
        let (block, at) = (layer / 6, layer % 6);
        let base = block * 6;
        match self {
            Layout::MaPairs => match at {
                0 if block % 2 == 1 => Role::GlobalShared { from: base - 6 },
                0 => Role::Global,
                _ => sliding(base, at, [1, 3]),
            },
            Layout::MaOffset => match at {
                5 if block > 0 => Role::GlobalShared { from: 5 },
                5 => Role::Global,
                _ => sliding(base, at, [0, 2]),
            },
            Layout::OneInSix => match at {
                0 if block > 0 => Role::GlobalShared { from: 0 },
                0 => Role::Global,
                _ => sliding(base, at, [1, 3]),
            },
        }
    }
}

/// A sliding layer of a block whose pair starts at `firsts[0]` and triple at
/// `firsts[1]` (offsets within the block).
fn sliding(base: usize, at: usize, firsts: [usize; 2]) -> Role {
    let first = if at >= firsts[1] {
        firsts[1]
    } else {
        firsts[0]
    };
    if at == first {
        Role::Sliding
    } else {
        Role::SlidingShared { from: base + first }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ma_pairs_on_24_layers_is_mixattentions_table() {
        let roles = Layout::MaPairs.roles(24);
        assert_eq!(roles[0], Role::Global);
        assert_eq!(roles[6], Role::GlobalShared { from: 0 });
        assert_eq!(roles[12], Role::Global);
        assert_eq!(roles[18], Role::GlobalShared { from: 12 });
        assert_eq!(roles[1], Role::Sliding);
        assert_eq!(roles[2], Role::SlidingShared { from: 1 });
        assert_eq!(roles[3], Role::Sliding);
        assert_eq!(roles[5], Role::SlidingShared { from: 3 });
        assert_eq!(roles[23], Role::SlidingShared { from: 21 });
    }

    #[test]
    fn offset_and_one_in_six_tie_their_global_caches() {
        let offset = Layout::MaOffset.roles(24);
        for g in [11, 17, 23] {
            assert_eq!(offset[g], Role::GlobalShared { from: 5 });
        }
        assert_eq!(offset[5], Role::Global);
        assert_eq!(offset[0], Role::Sliding);
        assert_eq!(offset[1], Role::SlidingShared { from: 0 });
        assert_eq!(offset[4], Role::SlidingShared { from: 2 });
        let six = Layout::OneInSix.roles(30);
        assert_eq!(six[24], Role::GlobalShared { from: 0 });
        assert_eq!(six.iter().filter(|r| **r == Role::Global).count(), 1);
    }

    #[test]
    fn every_reference_points_back() {
        for layout in [Layout::MaPairs, Layout::MaOffset, Layout::OneInSix] {
            for n in [1, 5, 7, 13, 30, 32] {
                for (i, role) in layout.roles(n).iter().enumerate() {
                    if let Role::GlobalShared { from } | Role::SlidingShared { from } = role {
                        assert!(*from < i, "{layout:?} layer {i} <- {from}");
                    }
                }
            }
        }
        assert!("ma-triples".parse::<Layout>().is_err());
    }
}
