//! From measured errors to the per-layer table: Pareto pruning, grouping,
//! and the search under the budget.

use crate::calibrate::pareto::{group_layers, pareto_front, Candidate, LayerGroup};
use crate::calibrate::search::{bit_capacity, search};
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
}

impl Plan {
    /// The chosen pairs' mean bits, over the offloaded layers.
    pub fn mean_bits(&self) -> f64 {
        let n = self.layers.len().max(1) as f64;
        self.layers
            .iter()
            .map(|l| l.chosen.pair.mean_bits())
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

/// Prunes each layer of `measured` (layer, every pair's error) to its Pareto
/// front, groups the layers, and searches the assignment of least total error
/// within `budget_bits` mean bits.
pub fn choose(
    measured: &[(usize, Vec<Candidate>)],
    budget_bits: f64,
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
    let capacity = bit_capacity(budget_bits, measured.len());
    let Some(found) = search(&options, capacity) else {
        let fewest = options
            .iter()
            .map(|o| {
                o.iter()
                    .map(|c| c.pair.mean_bits())
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: u8, value: u8, error: f64) -> Candidate {
        Candidate::of(key, value, error)
    }

    #[test]
    fn the_plan_spends_bits_where_they_cut_most_error() {
        let sensitive = vec![c(8, 8, 0.001), c(4, 4, 0.2), c(2, 2, 0.5)];
        let robust = vec![c(8, 8, 0.001), c(4, 4, 0.002), c(2, 2, 0.004)];
        let measured = [(1, sensitive), (2, robust.clone()), (3, robust)];
        let p = choose(&measured, 4.0).expect("plan");
        let chosen: Vec<String> = p.layers.iter().map(|l| l.chosen.pair.to_string()).collect();
        assert_eq!(chosen, ["K8V8", "K2V2", "K2V2"]);
        assert_eq!(p.mean_bits(), 4.0);
        assert!((p.mean_error() - 0.003).abs() < 1e-12);
        assert_eq!(p.max_error(), Some((2, 0.004)));
        assert_eq!(p.groups.len(), 1, "every front holds the same pairs");
    }

    #[test]
    fn bad_budgets_and_unreachable_ones_are_errors() {
        let measured = [(1, vec![c(8, 8, 0.01)])];
        for b in [1.9, 16.5, f64::NAN] {
            assert!(
                matches!(choose(&measured, b), Err(CalibrateError::Budget(_))),
                "{b}"
            );
        }
        let err = choose(&measured, 4.0).unwrap_err();
        assert!(
            matches!(err, CalibrateError::NoAssignment { fewest, .. } if fewest == 8.0),
            "{err}"
        );
        assert!(choose(&[(1, vec![c(8, 8, f64::NAN)])], 8.0).is_err());
    }
}
