//! Per-block work shared by the policies that search the store's key bounds
//! ([`crate::bounds`]): each block's upper bound on each head's logits, and
//! the exact logits of a block's keys.

// Index loops over heads read several per-head arrays at once.
#![allow(clippy::needless_range_loop)]

use super::passes::Step;
use super::scratch::{BlockScratch, Scratch};
use crate::bounds::BoundQueries;
use crate::error::CpuError;
use crate::reads::KeyQueries;
use crate::rows::Rows;
use crate::store::HeadStore;

/// Readies a search over the blocks of `head`: room for every key's logit,
/// each block's bounds in `scratch.blocks` (see [`block_bounds`]) and
/// `scratch.blocks.order` holding the blocks in position order. Returns the
/// number of blocks; an error if the bounds lag the stored keys.
pub(super) fn prepare_blocks(
    head: &HeadStore,
    step: &Step,
    scratch: &mut Scratch,
) -> Result<usize, CpuError> {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    if head.bounds.covered() != n {
        return Err(CpuError::Config("key bounds lag the stored keys".into()));
    }
    let nb = head.bounds.blocks();
    scratch.ensure_logits(n, g);
    scratch.ensure_blocks(nb, g * step.d);
    let blocks = &mut scratch.blocks;
    block_bounds(head, step, g, nb, blocks);
    for (j, o) in blocks.order[..nb].iter_mut().enumerate() {
        *o = j as u32;
    }
    Ok(nb)
}

/// Each block's upper bound on each head's logits into `blocks.upper`
/// (`[nb][8]`; NaN, from non-finite keys, as +inf: such blocks are scanned)
/// and the largest over the heads into `blocks.top`.
fn block_bounds(head: &HeadStore, step: &Step, g: usize, nb: usize, blocks: &mut BlockScratch) {
    let d = step.d;
    let abs = &mut blocks.abs_queries[..g * d];
    for (a, q) in abs.iter_mut().zip(step.queries) {
        *a = q.abs();
    }
    let mut l1 = [0.0f32; 8];
    for (h, l) in l1.iter_mut().enumerate().take(g) {
        *l = abs[h * d..(h + 1) * d].iter().sum();
    }
    let reach = head.keys.key_offset().map_or(0.0, |offset| {
        offset.iter().fold(0.0f32, |m, x| m.max(x.abs()))
    });
    let q = BoundQueries {
        queries: &step.queries[..g * d],
        abs,
        l1,
        reach,
    };
    for (j, (upper, top)) in blocks.upper[..nb * 8]
        .chunks_exact_mut(8)
        .zip(&mut blocks.top[..nb])
        .enumerate()
    {
        let upper = &mut upper[..g];
        head.bounds.upper(j, &q, upper);
        *top = f32::NEG_INFINITY;
        for (u, slack) in upper.iter_mut().zip(step.kq.int_slack) {
            // int4 and int2 keys' dot products use an int8 query.
            *u += slack;
            *u = if u.is_nan() {
                f32::INFINITY
            } else {
                *u * step.scale
            };
            *top = top.max(*u);
        }
    }
}

/// The logits of `keys` for the `g` heads of `kq` into `logits[h]`, raising
/// each head's `max` (NaN logits are ignored).
pub(super) fn block_logits(
    rows: &Rows,
    kq: &KeyQueries,
    scale: f32,
    g: usize,
    keys: std::ops::Range<usize>,
    logits: &mut [Vec<f32>],
    max: &mut [f32; 8],
) {
    let mut dots = [0.0f32; 8];
    for i in keys {
        rows.dots(i, kq, &mut dots[..g]);
        for (h, (&x, m)) in dots[..g].iter().zip(max.iter_mut()).enumerate() {
            let l = x * scale;
            logits[h][i] = l;
            *m = m.max(l);
        }
    }
}
