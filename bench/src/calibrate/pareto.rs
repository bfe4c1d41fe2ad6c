//! KVTuner's pruning: per layer, only the pairs no other pair beats on both
//! mean bits and error; then layers grouped by the pairs they kept.

use std::collections::BTreeMap;

use crate::calibrate::pairs::BitPair;

/// One measured pair of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The pair.
    pub pair: BitPair,
    /// The layer's error with it, as the calibration's objective measures it.
    pub error: f64,
    /// The pair's bits in the search's unit ([`BitPair::units`] over the
    /// layer's kv heads).
    pub units: usize,
}

impl Candidate {
    /// `pair` measured at `error` in a layer of `heads` kv heads.
    pub fn new(pair: BitPair, error: f64, heads: usize) -> Candidate {
        Candidate {
            pair,
            error,
            units: pair.units(heads),
        }
    }

    /// A candidate of `key` and `value` bits measured at `error`, in a layer
    /// of one kv head.
    #[cfg(test)]
    pub(crate) fn of(key: u8, value: u8, error: f64) -> Candidate {
        Candidate::new(BitPair::new(key, value), error, 1)
    }
}

/// Whether `a` dominates `b`: no more bits, no more error, and less of one.
fn dominates(a: &Candidate, b: &Candidate) -> bool {
    let (ab, bb) = (a.units, b.units);
    ab <= bb && a.error <= b.error && (ab < bb || a.error < b.error)
}

/// The Pareto-optimal candidates, by ascending bits (so by descending error);
/// of candidates equal in both, the first given is kept.
pub fn pareto_front(candidates: &[Candidate]) -> Vec<Candidate> {
    let mut front: Vec<Candidate> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let beaten = candidates.iter().any(|o| dominates(o, c));
        let repeated = candidates[..i]
            .iter()
            .any(|o| o.units == c.units && o.error == c.error);
        if !beaten && !repeated {
            front.push(*c);
        }
    }
    front.sort_by_key(|c| c.units);
    front
}

/// Layers whose Pareto fronts hold the same pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGroup {
    /// The pairs of the front, by ascending bits.
    pub pairs: Vec<BitPair>,
    /// The layers, ascending.
    pub layers: Vec<usize>,
}

/// Groups `fronts` (layer, front) by the pairs each front holds, the groups
/// in order of their first layer.
pub fn group_layers(fronts: &[(usize, Vec<Candidate>)]) -> Vec<LayerGroup> {
    let mut by_pairs: BTreeMap<Vec<BitPair>, Vec<usize>> = BTreeMap::new();
    for (layer, front) in fronts {
        let pairs = front.iter().map(|c| c.pair).collect();
        by_pairs.entry(pairs).or_default().push(*layer);
    }
    let mut groups: Vec<LayerGroup> = by_pairs
        .into_iter()
        .map(|(pairs, mut layers)| {
            layers.sort_unstable();
            LayerGroup { pairs, layers }
        })
        .collect();
    groups.sort_by_key(|g| g.layers.first().copied());
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: u8, value: u8, error: f64) -> Candidate {
        Candidate::of(key, value, error)
    }

    #[test]
    fn dominated_pairs_are_pruned_and_the_front_is_sorted() {
        let given = [
            c(8, 8, 0.01),
            c(8, 4, 0.02),
            c(4, 8, 0.05), // beaten by K8V4: as many bits, more error
            c(4, 4, 0.04),
            c(2, 8, 0.09), // beaten by K4V4: more bits, more error
            c(2, 2, 0.30),
        ];
        let front = pareto_front(&given);
        let pairs: Vec<String> = front.iter().map(|c| c.pair.to_string()).collect();
        assert_eq!(pairs, ["K2V2", "K4V4", "K8V4", "K8V8"]);
        for w in front.windows(2) {
            assert!(w[0].error > w[1].error);
        }
        for c in &given {
            let kept = front.contains(c);
            let beaten = given.iter().any(|o| dominates(o, c));
            assert_eq!(kept, !beaten, "{:?}", c);
        }
    }

    #[test]
    fn equal_candidates_keep_the_first() {
        let front = pareto_front(&[c(8, 4, 0.02), c(4, 8, 0.02)]);
        assert_eq!(front, [c(8, 4, 0.02)]);
    }

    #[test]
    fn layers_with_the_same_front_share_a_group() {
        let a = vec![c(4, 4, 0.1), c(8, 8, 0.01)];
        let b = vec![c(8, 8, 0.02)];
        let groups = group_layers(&[(3, a.clone()), (1, b.clone()), (2, a), (5, b)]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].layers, [1, 5]);
        assert_eq!(groups[1].layers, [2, 3]);
        assert_eq!(groups[1].pairs.len(), 2);
    }
}
