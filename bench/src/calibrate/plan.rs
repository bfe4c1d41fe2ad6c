//! From measured errors to the per-layer table: Pareto pruning, grouping,
//! and the search under the budget.

use crate::calibrate::pareto::{group_layers, pareto_front, Candidate, LayerGroup};
use crate::calibrate::search::{search, unit_capacity};
use crate::calibrate::CalibrateError;

/// The lowest and highest mean bits a budget may ask for.
pub const BUDGET_RANGE: (f64, f64) = (2.0, 16.0);

/// One offloaded layer's measurements and choice.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The layer.
    pub layer: usize,
    /// Every pair measured, in the order given.
    pub measured: Vec<Candidate>,
    /// The Pareto-optimal ones, by ascending bits.
    pub front: Vec<Candidate>,
    /// The pair chosen, from the front.
    pub chosen: Candidate,
}

/// The calibrated table of the offloaded layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Per offloaded layer, ascending.
    pub layers: Vec<LayerPlan>,
    /// The layers grouped by the pairs of their fronts.
    pub groups: Vec<LayerGroup>,
    /// The budget, in mean bits per offloaded key and value element.
    pub budget_bits: f64,
    /// The kv heads of each layer, over which a pair's bits are counted.
    pub heads: usize,
}

impl Plan {
    /// The chosen pairs' mean bits, over the offloaded layers.
    pub fn mean_bits(&self) -> f64 {
        let n = self.layers.len().max(1) as f64;
        self.layers
            .iter()
            .map(|l| l.chosen.pair.mean_bits(self.heads))
            .sum::<f64>()
            / n
    }

    /// The predicted error: the chosen pairs' errors averaged over the layers.
    pub fn mean_error(&self) -> f64 {
        let n = self.layers.len().max(1) as f64;
        self.layers.iter().map(|l| l.chosen.error).sum::<f64>() / n
    }

    /// The layer of largest predicted error (the first of equals), with it.
    pub fn max_error(&self) -> Option<(usize, f64)> {
        self.layers
            .iter()
            .map(|l| (l.layer, l.chosen.error))
            .reduce(|a, b| if b.1 > a.1 { b } else { a })
    }
}

/// Checks a budget before anything runs.
pub fn check_budget(budget_bits: f64) -> Result<(), CalibrateError> {
    let (lo, hi) = BUDGET_RANGE;
    if (lo..=hi).contains(&budget_bits) {
        Ok(())
    } else {
        Err(CalibrateError::Budget(budget_bits))
    }
}

/// Prunes each layer of `measured` (layer, every pair's error; layers of
/// `heads` kv heads) to its Pareto front, groups the layers, and searches the
/// assignment of least total error within `budget_bits` mean bits.
pub fn choose(
    measured: &[(usize, Vec<Candidate>)],
    budget_bits: f64,
    heads: usize,
) -> Result<Plan, CalibrateError> {
    check_budget(budget_bits)?;
    if let Some((layer, c)) = measured
        .iter()
        .flat_map(|(l, cs)| cs.iter().map(move |c| (*l, c)))
        .find(|(_, c)| !c.error.is_finite())
    {
        return Err(CalibrateError::Measure(format!(
            "layer {layer}, {}: the error is not finite",
            c.pair
        )));
    }
    let fronts: Vec<(usize, Vec<Candidate>)> = measured
        .iter()
        .map(|(l, cs)| (*l, pareto_front(cs)))
        .collect();
    let options: Vec<Vec<Candidate>> = fronts.iter().map(|(_, f)| f.clone()).collect();
    let capacity = unit_capacity(budget_bits, measured.len(), heads);
    let Some(found) = search(&options, capacity) else {
        let fewest = options
            .iter()
            .map(|o| {
                o.iter()
                    .map(|c| c.pair.mean_bits(heads))
                    .fold(f64::INFINITY, f64::min)
            })
            .sum::<f64>()
            / options.len().max(1) as f64;
        return Err(CalibrateError::NoAssignment {
            budget: budget_bits,
            fewest,
            skipped: String::new(),
        });
    };
    let layers = fronts
        .iter()
        .zip(measured)
        .zip(&found.choices)
        .map(|(((layer, front), (_, all)), &i)| LayerPlan {
            layer: *layer,
            measured: all.clone(),
            front: front.clone(),
            chosen: front[i],
        })
        .collect();
    Ok(Plan {
        layers,
        groups: group_layers(&fronts),
        budget_bits,
        heads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::pairs::BitPair;

    fn c(key: u8, value: u8, error: f64) -> Candidate {
        Candidate::of(key, value, error)
    }

    #[test]
    fn the_plan_spends_bits_where_they_cut_most_error() {
        let sensitive = vec![c(8, 8, 0.001), c(4, 4, 0.2), c(2, 2, 0.5)];
        let robust = vec![c(8, 8, 0.001), c(4, 4, 0.002), c(2, 2, 0.004)];
        let measured = [(1, sensitive), (2, robust.clone()), (3, robust)];
        let p = choose(&measured, 4.0, 1).expect("plan");
        let chosen: Vec<String> = p.layers.iter().map(|l| l.chosen.pair.to_string()).collect();
        assert_eq!(chosen, ["K8V8", "K2V2", "K2V2"]);
        assert_eq!(p.mean_bits(), 4.0);
        assert!((p.mean_error() - 0.003).abs() < 1e-12);
        assert_eq!(p.max_error(), Some((2, 0.004)));
        assert_eq!(p.groups.len(), 1, "every front holds the same pairs");
    }

    #[test]
    fn heads_at_int2_step_a_layer_between_pairs() {
        let k4v4 = BitPair::new(4, 4);
        let one = k4v4.with_int2_heads(1);
        let k4v2 = BitPair::new(4, 2);
        let layer = |errors: [f64; 3]| {
            [k4v4, one, k4v2]
                .iter()
                .zip(errors)
                .map(|(&p, e)| Candidate::new(p, e, 3))
                .collect::<Vec<_>>()
        };
        let measured = [
            (1, layer([0.01, 0.012, 0.2])),
            (2, layer([0.01, 0.011, 0.05])),
        ];
        // 3.5 mean bits over two layers of three heads: 42 units. Whole pairs
        // allow K4V4 (24) beside K4V2 (18) at best; one int2 head in each
        // layer (20 + 20) costs far less error.
        let p = choose(&measured, 3.5, 3).expect("plan");
        let chosen: Vec<BitPair> = p.layers.iter().map(|l| l.chosen.pair).collect();
        assert_eq!(chosen, [one, one]);
        assert!((p.mean_bits() - 10.0 / 3.0).abs() < 1e-12);
        let whole: Vec<_> = measured
            .iter()
            .map(|(l, c)| (*l, vec![c[0], c[2]]))
            .collect();
        let p = choose(&whole, 3.5, 3).expect("plan");
        assert!((p.mean_error() - 0.03).abs() < 1e-12);
    }

    #[test]
    fn bad_budgets_and_unreachable_ones_are_errors() {
        let measured = [(1, vec![c(8, 8, 0.01)])];
        for b in [1.9, 16.5, f64::NAN] {
            assert!(
                matches!(choose(&measured, b, 1), Err(CalibrateError::Budget(_))),
                "{b}"
            );
        }
        let err = choose(&measured, 4.0, 1).unwrap_err();
        assert!(
            matches!(err, CalibrateError::NoAssignment { fewest, .. } if fewest == 8.0),
            "{err}"
        );
        assert!(choose(&[(1, vec![c(8, 8, f64::NAN)])], 8.0, 1).is_err());
    }
}
