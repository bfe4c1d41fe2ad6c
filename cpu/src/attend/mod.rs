//! Attention over one kv head's offloaded keys for all query heads of its GQA
//! group: LSH retrieval + MagicPIG's importance-weighted estimate, threshold
//! (half-space) reporting over the keys' block bounds, and the dense, exact
//! top-k and oracle-sampling baselines.

mod blocks;
mod dense;
mod lsh;
mod oracle;
mod passes;
mod safety;
mod scratch;
mod threshold;
mod topk;

pub(crate) use passes::Partials;
pub(crate) use scratch::Scratch;

use crate::bounds::BOUND_BLOCK;
use crate::error::CpuError;
use crate::policy::{Attend, Policy};
use crate::reads::KeyQueries;
use crate::store::HeadStore;
use passes::Step;

/// Computes the partials of the `g = queries.len() / d` query heads of one GQA
/// group over one kv head into `parts` (`out` is `g * d`, `lse`, `touched`
/// and `blocks` are `g`). Policies that read every key count every block
/// scanned; the threshold policy counts the blocks it scanned, LSH the blocks
/// holding a key it retrieved for the head.
/// `query_bits`, when given, are the queries' sign bits for the head's LSH
/// tables (as `HeadStore::append_hashing` writes them), else they are computed.
/// Every policy turns logits into weights with `attend.softmax`, and its
/// log-sum-exp is the log of the sum of those weights (times `e^max`), so
/// partials merge as parts of one softmax of the same approximate weights.
/// Returns the nanoseconds spent in LSH retrieval.
pub(crate) fn attend_group(
    head: &HeadStore,
    d: usize,
    queries: &[f32],
    query_bits: Option<&[u64]>,
    attend: &Attend,
    scratch: &mut Scratch,
    parts: Partials,
) -> Result<u64, CpuError> {
    let g = queries.len() / d;
    let n = head.len();
    parts.out.iter_mut().for_each(|x| *x = 0.0);
    parts.lse.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    parts.touched.iter_mut().for_each(|x| *x = 0);
    parts.blocks.fill(n.div_ceil(BOUND_BLOCK) as u32);
    if n == 0 || g == 0 {
        return Ok(0);
    }
    if g > 8 {
        return Err(CpuError::Shape(format!(
            "group of {g} query heads (at most 8)"
        )));
    }
    scratch.ensure(n, g);
    let kq = KeyQueries::new(&head.keys, queries, d);
    let step = Step {
        d,
        queries,
        kq: &kq,
        scale: 1.0 / (d as f32).sqrt(),
        ln_u: None,
        value_skip: 0,
        exact: None,
        softmax: attend.softmax,
    };
    match &attend.policy {
        Policy::Dense => dense::attend(head, &step, scratch, parts),
        Policy::TopK(k) => topk::attend(head, &step, *k, scratch, parts),
        Policy::Oracle { budget, seed } => {
            oracle::attend(head, &step, *budget, *seed, scratch, parts)
        }
        Policy::Lsh(p) => return lsh::attend(head, step, query_bits, p, scratch, parts),
        Policy::Threshold(p) => threshold::attend(head, &step, p, scratch, parts)?,
    }
    Ok(0)
}
