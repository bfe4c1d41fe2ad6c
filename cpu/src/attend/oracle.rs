//! Oracle sampling: keys drawn i.i.d. from the exact softmax.

use super::passes::{every_logit, Partials, Step};
use super::scratch::Scratch;
use crate::store::HeadStore;
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::sas::Softmax;

/// Per query head `h` of `step`, `budget` keys drawn from its softmax (exact,
/// or SAS's weights under `step.softmax`; seed `seed ^ h`): the output is
/// their mean value, the lse that of the weights drawn from.
pub(super) fn attend(
    head: &HeadStore,
    step: &Step,
    budget: usize,
    seed: u64,
    scratch: &mut Scratch,
    parts: Partials,
) {
    let (n, d) = (head.len(), step.d);
    let g = step.queries.len() / d;
    scratch.ensure_logits(n, g);
    every_logit(head, step.kq, step.scale, g, n, &mut scratch.logits);
    for h in 0..g {
        let out = &mut parts.out[h * d..(h + 1) * d];
        let logits = &scratch.logits[h][..n];
        let draws = Draws {
            budget,
            seed: seed ^ h as u64,
            softmax: step.softmax,
        };
        let seen = &mut scratch.sel.mask;
        (parts.lse[h], parts.touched[h]) = sample(head, logits, draws, &mut scratch.cdf, seen, out);
    }
}

/// How many keys one head draws, from which seed and which softmax.
struct Draws {
    budget: usize,
    seed: u64,
    softmax: Softmax,
}

/// Draws `budget` keys from the softmax of `logits` (not empty) and sums their
/// values into `out`, each with weight `1 / budget`. `seen` (all zero, and
/// left so) marks the keys drawn. Returns the exact lse (`-inf` with no
/// draw) and the distinct keys drawn.
fn sample(
    head: &HeadStore,
    logits: &[f32],
    draws: Draws,
    cdf: &mut Vec<f64>,
    seen: &mut [u8],
    out: &mut [f32],
) -> (f32, u32) {
    let n = logits.len();
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    cdf.clear();
    let mut acc = 0.0f64;
    for &x in logits {
        acc += match draws.softmax {
            Softmax::Exact => ((x - mx) as f64).exp(),
            sas => f64::from(sas.weight(x - mx)),
        };
        cdf.push(acc);
    }
    let budget = draws.budget;
    if budget == 0 {
        return (f32::NEG_INFINITY, 0);
    }
    let mut rng = SplitMix64(draws.seed);
    let w = 1.0 / budget as f32;
    let mut distinct = 0;
    let mut picked = Vec::with_capacity(0);
    for _ in 0..budget {
        let r = rng.next_f64() * acc;
        let i = cdf.partition_point(|&c| c <= r).min(n - 1);
        head.values.axpys(i, out, &[w]);
        if seen[i] == 0 {
            seen[i] = 1;
            distinct += 1;
            if picked.capacity() == 0 {
                picked.reserve(budget);
            }
            picked.push(i);
        }
    }
    for i in picked {
        seen[i] = 0;
    }
    // `budget` draws of weight 1/budget each.
    head.values.finish_sums(out, &[1.0]);
    (mx + acc.ln() as f32, distinct)
}
