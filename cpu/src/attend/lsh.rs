//! LSH sampling (MagicPIG): the keys retrieved by the index, each logit
//! corrected by `-ln u`, the log of the key's probability of being retrieved;
//! with a safety set, each head's top keys are attended exactly besides.

use super::passes::{attend_selected, Partials, Step};
use super::safety::mark_safety_sets;
use super::scratch::Scratch;
use crate::bounds::BOUND_BLOCK;
use crate::error::CpuError;
use crate::policy::LshParams;
use crate::retrieval::retrieve;
use crate::store::HeadStore;
use std::time::Instant;

/// Attends the keys retrieved for each query head of `step`, and its safety
/// set ([`LshParams::safety_size`]). `query_bits`, when given, are the queries' sign bits
/// (else they are hashed here). Returns the nanoseconds spent in retrieval.
pub(super) fn attend(
    head: &HeadStore,
    step: Step,
    query_bits: Option<&[u64]>,
    p: &LshParams,
    scratch: &mut Scratch,
    parts: Partials,
) -> Result<u64, CpuError> {
    let ix = head
        .index
        .as_ref()
        .ok_or_else(|| CpuError::Config("policy lsh on a store without an index".into()))?;
    let (n, g) = (head.len(), step.queries.len() / step.d);
    let top = p.safety_size(n);
    let scanned = match top {
        0 => 0,
        top => mark_safety_sets(head, &step, top, scratch)?,
    };
    let t0 = Instant::now();
    let (rs, sel) = (&mut scratch.retrieval, &mut scratch.sel);
    let mut nu = retrieve(ix, n, step.d, step.queries, query_bits, p, rs, sel);
    let retrieval_ns = t0.elapsed().as_nanos() as u64;
    blocks_holding(&sel.union[..nu], &sel.umask[..nu], &mut *parts.blocks);
    if top > 0 {
        nu = sel.merge_sorted(nu, &scratch.safety_keys, &scratch.safety);
        // The search scanned its blocks for every head of the group.
        for b in &mut parts.blocks[..g] {
            *b = (*b).max(scanned as u32);
        }
    }
    let exact = (top > 0).then_some(&scratch.safety[..n]);
    let step = Step {
        ln_u: Some(&ix.ln_u),
        value_skip: p.value_skip,
        exact,
        ..step
    };
    attend_selected(head, &step, &scratch.sel, nu, &mut scratch.pass1, parts);
    for &i in &scratch.safety_keys {
        scratch.safety[i as usize] = 0;
    }
    scratch.safety_keys.clear();
    Ok(retrieval_ns)
}

/// Per head (`blocks.len()` of them), the number of blocks of
/// [`BOUND_BLOCK`] keys holding a key of `union` (sorted) selected for it in
/// `umask`: LSH's counterpart of the threshold policy's blocks scanned.
fn blocks_holding(union: &[u32], umask: &[u8], blocks: &mut [u32]) {
    blocks.fill(0);
    let mut block = usize::MAX;
    let mut seen = 0u8;
    for (&i, &m) in union.iter().zip(umask) {
        let b = i as usize / BOUND_BLOCK;
        if b != block {
            (block, seen) = (b, 0);
        }
        let new = m & !seen;
        seen |= m;
        for (h, count) in blocks.iter_mut().enumerate().take(8) {
            *count += u32::from((new >> h) & 1);
        }
    }
}
