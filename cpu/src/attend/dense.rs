//! Exact attention over every stored key.

use super::passes::{attend_selected, Partials, Step};
use super::scratch::Scratch;
use crate::store::HeadStore;

/// Attends every key of `head` with every query head of `step`.
pub(super) fn attend(head: &HeadStore, step: &Step, scratch: &mut Scratch, parts: Partials) {
    let g = step.queries.len() / step.d;
    let nu = scratch.sel.all(head.len(), ((1u32 << g) - 1) as u8);
    attend_selected(head, step, &scratch.sel, nu, &mut scratch.pass1, parts);
}
