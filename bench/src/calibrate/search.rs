//! The per-layer assignment: one pair per layer, minimising the sum of the
//! layers' predicted errors with the mean bits under a budget. A
//! multiple-choice knapsack solved exactly by dynamic programming over the
//! layers, bits counted as `K + V` summed over a layer's kv heads
//! ([`crate::calibrate::pairs::BitPair::units`]).

use crate::calibrate::pareto::Candidate;

/// The search's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Per layer, the index of its chosen candidate.
    pub choices: Vec<usize>,
    /// Sum of the chosen candidates' errors.
    pub total_error: f64,
    /// Sum of the chosen candidates' units.
    pub units: usize,
}

/// The most units over `layers` layers of `heads` kv heads each whose mean
/// bits stay within `budget_bits`.
pub fn unit_capacity(budget_bits: f64, layers: usize, heads: usize) -> usize {
    // The tolerance keeps a budget such as 3.25 from losing a unit to rounding.
    (2.0 * budget_bits * (layers * heads) as f64 + 1e-9).floor() as usize
}

/// The assignment of least total error with `Σ units ≤ capacity`, one
/// candidate per layer of `layers`; `None` when even the fewest bits exceed
/// the capacity (or a layer has no candidate). Ties go to fewer bits, then
/// to earlier candidates.
pub fn search(layers: &[Vec<Candidate>], capacity: usize) -> Option<Assignment> {
    const NONE: f64 = f64::INFINITY;
    // best[b]: least error of the layers so far with exactly b bits.
    let mut best = vec![NONE; capacity + 1];
    best[0] = 0.0;
    let mut picks: Vec<Vec<usize>> = Vec::with_capacity(layers.len());
    for options in layers {
        let mut next = vec![NONE; capacity + 1];
        let mut pick = vec![usize::MAX; capacity + 1];
        for (b, &err) in best.iter().enumerate().filter(|(_, e)| e.is_finite()) {
            for (i, c) in options.iter().enumerate() {
                let nb = b + c.units;
                if nb <= capacity && err + c.error < next[nb] {
                    next[nb] = err + c.error;
                    pick[nb] = i;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    let (mut b, total_error) = best
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, e)| e.is_finite())
        .min_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)))?;
    let units = b;
    let mut choices = vec![0; layers.len()];
    for (l, pick) in picks.iter().enumerate().rev() {
        choices[l] = pick[b];
        b -= layers[l][pick[b]].units;
    }
    Some(Assignment {
        choices,
        total_error,
        units,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::pairs::BitPair;
    use crate::calibrate::pareto::pareto_front;

    const WIDTHS: [u8; 3] = [2, 4, 8];
    const HEADS: usize = 3;

    /// A small random table: each layer gets some of the {2,4,8}² pairs
    /// with errors that fall, noisily, with the bits.
    fn table(seed: u64, layers: usize) -> Vec<Vec<Candidate>> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (0..layers)
            .map(|_| {
                let mut options = Vec::new();
                for key in WIDTHS {
                    for value in WIDTHS {
                        if next() % 3 == 0 {
                            continue;
                        }
                        let noise = (next() % 1000) as f64 / 1000.0;
                        let error =
                            (noise + 0.5) / f64::from(u32::from(key) * 2 + u32::from(value));
                        let int2 = (next() % 3) as u8;
                        let pair = BitPair::new(key, value).with_int2_heads(int2);
                        options.push(Candidate::new(pair, error, HEADS));
                    }
                }
                options
            })
            .collect()
    }

    /// Least total error over every assignment within `capacity`.
    fn brute_force(layers: &[Vec<Candidate>], capacity: usize) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; layers.len()];
        loop {
            let bits: usize = idx.iter().zip(layers).map(|(&i, o)| o[i].units).sum();
            if bits <= capacity {
                let err: f64 = idx.iter().zip(layers).map(|(&i, o)| o[i].error).sum();
                best = Some(best.map_or(err, |b: f64| b.min(err)));
            }
            let mut l = 0;
            loop {
                if l == layers.len() {
                    return best;
                }
                idx[l] += 1;
                if idx[l] < layers[l].len() {
                    break;
                }
                idx[l] = 0;
                l += 1;
            }
        }
    }

    #[test]
    fn the_search_is_optimal_and_keeps_the_budget() {
        let mut feasible = 0;
        for seed in 0..60 {
            let layers = table(seed, 1 + (seed as usize % 4));
            if layers.iter().any(Vec::is_empty) {
                continue;
            }
            for budget in [2.0, 3.0, 3.25, 4.0, 5.5, 8.0] {
                let cap = unit_capacity(budget, layers.len(), HEADS);
                let found = search(&layers, cap);
                let expected = brute_force(&layers, cap);
                assert_eq!(
                    found.is_some(),
                    expected.is_some(),
                    "seed {seed} budget {budget}"
                );
                let (Some(found), Some(expected)) = (found, expected) else {
                    continue;
                };
                feasible += 1;
                assert!((found.total_error - expected).abs() < 1e-12, "seed {seed}");
                assert!(found.units <= cap);
                let bits: usize = found
                    .choices
                    .iter()
                    .zip(&layers)
                    .map(|(&i, o)| o[i].units)
                    .sum();
                assert_eq!(bits, found.units);
                let mean_bits = bits as f64 / (2 * HEADS * layers.len()) as f64;
                assert!(mean_bits <= budget + 1e-12);
                // Pruning to the Pareto fronts loses nothing.
                let fronts: Vec<_> = layers.iter().map(|o| pareto_front(o)).collect();
                let pruned = search(&fronts, cap).expect("the front holds the optimum");
                assert!((pruned.total_error - expected).abs() < 1e-12, "seed {seed}");
            }
        }
        assert!(feasible > 100, "{feasible} feasible cases");
    }

    #[test]
    fn capacity_counts_half_bits_of_the_mean_per_head() {
        assert_eq!(unit_capacity(3.25, 28, 1), 182);
        assert_eq!(unit_capacity(3.25, 28, 3), 546);
        assert_eq!(unit_capacity(4.0, 3, 1), 24);
        assert_eq!(unit_capacity(2.9, 1, 1), 5);
        assert_eq!(unit_capacity(2.9, 1, 8), 46);
    }

    #[test]
    fn an_unreachable_budget_has_no_assignment() {
        let eight = vec![Candidate::new(BitPair::new(8, 8), 0.01, 2)];
        assert!(search(&[eight.clone(), eight.clone()], unit_capacity(4.0, 2, 2)).is_none());
        let found = search(&[eight.clone(), eight], unit_capacity(8.0, 2, 2)).expect("fits");
        assert_eq!(found.choices, [0, 0]);
        assert!(search(&[vec![]], 100).is_none());
    }
}
