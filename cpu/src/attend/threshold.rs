//! Threshold (half-space) reporting, the practical form of "HSR-enhanced
//! sparse attention": per query head, the keys whose logit reaches a
//! threshold τ, found by scanning only the blocks of keys whose upper bound
//! (the store's per-block boxes, [`crate::bounds`]) reaches τ, then exact
//! softmax attention over them. A block is skipped only when its bound, which
//! no computed logit of its keys exceeds, is below τ: no false negatives.
//!
//! With `eps`, τ_h = m̂_h − ln(n/ε) follows the largest logit m̂_h found so
//! far; blocks are visited by descending bound so that m̂_h is found first
//! and τ_h rises early, and the scan stops at the first block whose bound is
//! below every head's τ (all later ones are lower). A block is skipped
//! against the τ of its turn, which only rises, so keys of skipped blocks are
//! below the final τ too; keys are reported against the final τ.

// Index loops over heads read several per-head arrays at once.
#![allow(clippy::needless_range_loop)]

use super::blocks::{block_logits, prepare_blocks};
use super::passes::{attend_selected, Partials, Step};
use super::scratch::{BlockScratch, Scratch};
use crate::bounds::BOUND_BLOCK;
use crate::error::CpuError;
use crate::policy::ThresholdParams;
use crate::retrieval::Selection;
use crate::store::HeadStore;

/// Attends, per query head of `step`, the keys at or above its threshold.
pub(super) fn attend(
    head: &HeadStore,
    step: &Step,
    p: &ThresholdParams,
    scratch: &mut Scratch,
    parts: Partials,
) -> Result<(), CpuError> {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    let nb = prepare_blocks(head, step, scratch)?;
    let blocks = &mut scratch.blocks;
    let mut cut = Cut::new(p, n);
    let order = &mut blocks.order[..nb];
    if cut.drop.is_some() {
        let top = &blocks.top;
        order.sort_unstable_by(|&a, &b| top[b as usize].total_cmp(&top[a as usize]));
    }
    let logits = &mut scratch.logits;
    let nv = scan(head, step, g, blocks, &mut cut, logits);
    let nu = report(
        &mut blocks.visited[..nv],
        n,
        g,
        &cut.tau,
        logits,
        &mut scratch.sel,
    );
    parts.blocks[..g].fill(nv as u32);
    attend_selected(head, step, &scratch.sel, nu, &mut scratch.pass1, parts);
    Ok(())
}

/// The thresholds τ of a group's heads, and how they follow the largest
/// logit found.
struct Cut {
    /// Per head, the threshold.
    tau: [f32; 8],
    /// With `eps`, `ln(n/ε)`: τ_h is the largest logit found less this.
    drop: Option<f32>,
}

impl Cut {
    fn new(p: &ThresholdParams, n: usize) -> Self {
        match *p {
            ThresholdParams::Mass { eps } => Cut {
                tau: [f32::NEG_INFINITY; 8],
                drop: Some((n as f64 / f64::from(eps)).ln() as f32),
            },
            ThresholdParams::Logit { b } => Cut {
                tau: [b; 8],
                drop: None,
            },
        }
    }
}

/// Visits the blocks of `blocks.order`, scanning those whose bound reaches
/// some head's τ (all their keys' logits, every head, into `logits`) and
/// raising τ with `eps`; there the order is by descending bound, so the scan
/// ends at the first block below every τ. Writes the blocks scanned to
/// `blocks.visited` and returns their number.
fn scan(
    head: &HeadStore,
    step: &Step,
    g: usize,
    blocks: &mut BlockScratch,
    cut: &mut Cut,
    logits: &mut [Vec<f32>],
) -> usize {
    let n = head.len();
    let mut max = [f32::NEG_INFINITY; 8];
    let mut nv = 0;
    for &j in blocks.order.iter().take(head.bounds.blocks()) {
        let j = j as usize;
        let upper = &blocks.upper[j * 8..j * 8 + g];
        let below = |h: usize| upper[h] < cut.tau[h];
        let lowest = cut.tau[..g].iter().fold(f32::INFINITY, |a, &t| a.min(t));
        if cut.drop.is_some() && blocks.top[j] < lowest {
            break;
        }
        if (0..g).all(below) {
            continue;
        }
        let keys = j * BOUND_BLOCK..((j + 1) * BOUND_BLOCK).min(n);
        block_logits(&head.keys, step.kq, step.scale, g, keys, logits, &mut max);
        if let Some(drop) = cut.drop {
            for h in 0..g {
                cut.tau[h] = max[h] - drop;
            }
        }
        blocks.visited[nv] = j as u32;
        nv += 1;
    }
    nv
}

/// Fills `sel.union`/`sel.umask` with the keys of the `visited` blocks (of
/// `n` keys in all) at or above each head's τ, in position order; returns
/// their number.
fn report(
    visited: &mut [u32],
    n: usize,
    g: usize,
    tau: &[f32; 8],
    logits: &[Vec<f32>],
    sel: &mut Selection,
) -> usize {
    visited.sort_unstable();
    let mut nu = 0;
    for &j in visited.iter() {
        let j = j as usize;
        for i in j * BOUND_BLOCK..((j + 1) * BOUND_BLOCK).min(n) {
            let mut m = 0u8;
            for h in 0..g {
                m |= u8::from(logits[h][i] >= tau[h]) << h;
            }
            sel.union[nu] = i as u32;
            sel.umask[nu] = m;
            nu += usize::from(m != 0);
        }
    }
    nu
}
