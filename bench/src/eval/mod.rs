//! `tandem eval`: how far an attention policy is from dense.
//!
//! - [`run`]: the driver, running every policy and dense through the split
//!   decode step on the same model, text and needle cases;
//! - [`metrics`]: teacher-forced top-1 agreement, KL and perplexity from logits;
//! - [`needle`]: RULER-style needle-in-a-haystack prompts (single, multi-key,
//!   multi-value) and their answer check;
//! - [`docqa`]: questions over long real documents and their answer check;
//! - [`probe`]: per-layer attention error against exact attention, as a split observer;
//! - [`corpus`]: the real text both run on;
//! - [`report`]: result rows as a markdown table, JSON and an SVG plot.

pub mod corpus;
pub mod docqa;
pub mod metrics;
pub mod needle;
pub mod probe;
pub mod report;
pub mod run;

pub use docqa::DocQaRow;
pub use metrics::{Agreement, AgreementAccumulator};
pub use needle::{NeedleBuilder, NeedleCase};
pub use report::{HeadRow, LayerRow, Row};
pub use run::{load_engine, run_doc_qa, run_doc_qa_with, run_eval, run_eval_with, EvalOptions};
