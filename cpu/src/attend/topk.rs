//! Exact attention over each query head's `k` keys with the largest logits.

use super::passes::{attend_selected, every_logit, Partials, Step};
use super::scratch::Scratch;
use crate::store::HeadStore;

/// Attends, per query head of `step`, its `k` keys of largest logit.
pub(super) fn attend(
    head: &HeadStore,
    step: &Step,
    k: usize,
    scratch: &mut Scratch,
    parts: Partials,
) {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    let k = k.min(n);
    scratch.ensure_logits(n, g);
    every_logit(head, step.kq, step.scale, g, n, &mut scratch.logits);
    if k > 0 {
        for h in 0..g {
            let logits = &scratch.logits[h][..n];
            mark_top_k(logits, k, 1 << h, &mut scratch.tmp, &mut scratch.sel.mask);
        }
    }
    let nu = scratch.sel.collect_mask(n);
    attend_selected(head, step, &scratch.sel, nu, &mut scratch.pass1, parts);
}

/// Sets `bit` in `mask` for the `k` (`1..=logits.len()`) largest `logits`:
/// everything above the k-th largest, then ties at it in position order.
fn mark_top_k(logits: &[f32], k: usize, bit: u8, tmp: &mut [f32], mask: &mut [u8]) {
    let n = logits.len();
    tmp[..n].copy_from_slice(logits);
    let (_, kth, _) = tmp[..n].select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    let thr = *kth;
    let mut m = 0;
    for (x, mk) in logits.iter().zip(mask.iter_mut()) {
        if *x > thr {
            *mk |= bit;
            m += 1;
        }
    }
    for (x, mk) in logits.iter().zip(mask.iter_mut()) {
        if m < k && *x == thr {
            *mk |= bit;
            m += 1;
        }
    }
}
