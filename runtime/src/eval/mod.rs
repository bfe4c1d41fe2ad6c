//! The model-independent parts of `tandem eval`: how far an attention policy is
//! from dense.
//!
//! - [`metrics`]: teacher-forced top-1 agreement, KL and perplexity from logits;
//! - [`needle`]: RULER-style needle-in-a-haystack prompts and their answer check;
//! - [`corpus`]: the real text both run on;
//! - [`report`]: result rows as a markdown table, JSON and an SVG plot.

pub mod corpus;
pub mod metrics;
pub mod needle;
pub mod report;

pub use metrics::{Agreement, AgreementAccumulator};
pub use needle::{NeedleBuilder, NeedleCase};
pub use report::{LayerRow, Row};
