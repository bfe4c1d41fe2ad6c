//! The results of `tandem eval`: one [`Row`] per (policy, context), shown as a
//! markdown table, written as JSON, and plotted as an SVG of quality against
//! keys touched with one line per policy family.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::eval::docqa::DocQaRow;
use crate::eval::metrics::Agreement;

/// Attention quality of one layer against dense.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRow {
    /// Layer index.
    pub layer: usize,
    /// ‖o − o_dense‖ / ‖o_dense‖ of the attention output, averaged over
    /// queries; `None` where the layer's attention is not observed (it does
    /// not offload).
    pub rel_l2_error: Option<f64>,
    /// Cosine of the attention output with dense, averaged over queries (`None`
    /// as above).
    pub cosine: Option<f64>,
    /// Fraction of the context's keys a query of this layer touched.
    pub keys_touched_fraction: f64,
}

/// One needle task's accuracy at one context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeedleScore {
    /// The task: `single`, `multikey` or `multivalue`.
    pub task: String,
    /// Cases asked.
    pub cases: usize,
    /// Fraction the policy answered.
    pub accuracy: f64,
    /// Fraction dense answered.
    pub dense_accuracy: f64,
}

/// Where one kv head's attention mass goes (`tandem eval --diagnose`),
/// averaged over its query heads and the positions scored. Masses are
/// fractions of the head's whole softmax (device and offloaded keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadRow {
    /// Layer index.
    pub layer: usize,
    /// Kv head of the layer.
    pub kv_head: usize,
    /// Mass on the offloaded keys.
    pub offloaded_mass: f64,
    /// Offloaded mass outside each query head's top keys (the diagnosis'
    /// safety-set size).
    pub tail_mass: f64,
    /// Offloaded mass LSH retrieval is expected to miss under the store's
    /// (K, L, t); 0 for a policy without an index.
    pub lsh_missed: f64,
    /// The same with the top keys attended exactly besides.
    pub lsh_missed_with_top: f64,
    /// Over the missed mass, the mean norm rank of the keys (0 smallest, 1
    /// largest of the head's keys).
    pub missed_norm_rank: f64,
    /// Over the missed mass, the mean cosine of the keys with the query.
    pub missed_cos: f64,
}

/// Everything measured for one policy at one context length.
///
/// In JSON a non-finite number (e.g. an infinite KL) is written as `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The model (`general.name`); empty in rows written before it was recorded.
    #[serde(default)]
    pub model: String,
    /// The policy as given on the command line, e.g. `lsh:K=8,L=75`.
    pub policy: String,
    /// Context length in tokens.
    pub context: usize,
    /// Teacher-forced positions scored.
    pub positions: usize,
    /// Fraction of positions where the policy's top-1 token is dense's.
    pub top1_agreement: f64,
    /// Mean KL(dense || policy) per position, nats.
    pub mean_kl: f64,
    /// Largest KL(dense || policy) at any position, nats.
    pub max_kl: f64,
    /// Perplexity of the text under the policy.
    pub ppl: f64,
    /// Perplexity of the text under dense.
    pub dense_ppl: f64,
    /// Needle cases asked (0: the needle task was not run).
    pub needle_cases: usize,
    /// Fraction of needle cases the policy answered; `None` if not run.
    pub needle_accuracy: Option<f64>,
    /// Fraction of the same cases dense answered; `None` if not run.
    pub dense_needle_accuracy: Option<f64>,
    /// Fraction of the context's keys a query touched, over all layers.
    pub keys_touched_fraction: f64,
    /// Offloaded blocks of 64 keys scanned / held, over offloaded layers and
    /// query heads (the threshold policy's pruning; 0 without offloading).
    #[serde(default)]
    pub blocks_scanned_fraction: f64,
    /// KV bytes per context token held on the dense device.
    pub device_bytes_per_token: f64,
    /// KV bytes per context token held by the CPU workers.
    pub cpu_bytes_per_token: f64,
    /// Fraction of the offloaded keys the CPU policy attended, over sparse
    /// layers and query heads (the device window and dense layers left out).
    #[serde(default)]
    pub offloaded_touched_fraction: f64,
    /// Per-layer attention error.
    pub per_layer: Vec<LayerRow>,
    /// Per (layer, kv head) diagnosis; empty unless asked for.
    #[serde(default)]
    pub per_head: Vec<HeadRow>,
    /// Every needle task's accuracy (the single task's also above).
    #[serde(default)]
    pub needles: Vec<NeedleScore>,
}

impl Row {
    /// A row with the teacher-forced measures of `agreement`; the rest default.
    pub fn new(policy: impl Into<String>, context: usize, agreement: &Agreement) -> Row {
        Row {
            policy: policy.into(),
            context,
            positions: agreement.positions,
            top1_agreement: agreement.top1_agreement,
            mean_kl: agreement.mean_kl,
            max_kl: agreement.max_kl,
            ppl: agreement.ppl,
            dense_ppl: agreement.dense_ppl,
            ..Row::default()
        }
    }

    /// The policy family: the name up to the first `:`, `{`, `(`, `[`, `=`, `,` or
    /// space, e.g. `lsh` for `lsh:K=8,L=75` and `topk` for `topk{64}`.
    pub fn family(&self) -> &str {
        let end = self
            .policy
            .find([':', '{', '(', '[', '=', ',', ' '])
            .unwrap_or(self.policy.len());
        &self.policy[..end]
    }
}

/// A markdown table with a header and one line per row.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| policy | context | top-1 | mean KL | max KL | ppl | dense ppl | needle | dense needle | keys touched | offloaded keys touched | blocks scanned | device B/tok | CPU B/tok |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    let needle = |x: Option<f64>| x.map_or_else(|| "–".into(), |x| format!("{:.0}%", 100.0 * x));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.4} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            r.policy.replace('|', "\\|"),
            r.context,
            pct(r.top1_agreement),
            r.mean_kl,
            r.max_kl,
            r.ppl,
            r.dense_ppl,
            needle(r.needle_accuracy),
            needle(r.dense_needle_accuracy),
            pct(r.keys_touched_fraction),
            pct(r.offloaded_touched_fraction),
            pct(r.blocks_scanned_fraction),
            r.device_bytes_per_token,
            r.cpu_bytes_per_token,
        );
    }
    out
}

/// Per-layer attention error, one markdown table per context: a line per
/// layer, a column per policy with the relative L2 error of the attention
/// output against dense (`–` where the layer does not offload, so its error is
/// not observed) and, in brackets, the keys its queries touched. Policies
/// without per-layer figures are left out.
pub fn per_layer_tables(rows: &[Row]) -> String {
    let mut out = String::new();
    let contexts: BTreeSet<usize> = rows.iter().map(|r| r.context).collect();
    for context in contexts {
        let cols: Vec<&Row> = rows
            .iter()
            .filter(|r| r.context == context && !r.per_layer.is_empty())
            .collect();
        if cols.is_empty() {
            continue;
        }
        let layers: BTreeSet<usize> = cols
            .iter()
            .flat_map(|r| r.per_layer.iter().map(|l| l.layer))
            .collect();
        let _ = writeln!(
            out,
            "\nPer-layer attention error at {context} tokens: relative L2 error of the output vs dense (keys touched)\n"
        );
        out.push_str("| layer |");
        for r in &cols {
            let _ = write!(out, " {} |", r.policy.replace('|', "\\|"));
        }
        out.push_str("\n|---:|");
        out.push_str(&"---:|".repeat(cols.len()));
        out.push('\n');
        for layer in layers {
            let _ = write!(out, "| {layer} |");
            for r in &cols {
                match r.per_layer.iter().find(|l| l.layer == layer) {
                    Some(l) => {
                        let error = l.rel_l2_error.map_or("–".into(), |e| format!("{e:.4}"));
                        let _ = write!(out, " {error} ({:.1}%) |", 100.0 * l.keys_touched_fraction);
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Every needle task's accuracy, a line per (policy, context, task), dense
/// beside; empty when no needle task ran.
pub fn needle_table(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        for s in &r.needles {
            if out.is_empty() {
                out.push_str("\n| policy | context | needle task | cases | policy | dense |\n|---|---:|---|---:|---:|---:|\n");
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.0}% | {:.0}% |",
                r.policy.replace('|', "\\|"),
                r.context,
                s.task,
                s.cases,
                100.0 * s.accuracy,
                100.0 * s.dense_accuracy
            );
        }
    }
    out
}

/// The document questions' results: a line per policy with its accuracy,
/// dense's, and the cases where the two differ.
pub fn doc_qa_table(rows: &[DocQaRow]) -> String {
    let mut out = String::from(
        "\n| policy | document questions | policy | dense | policy right, dense wrong | dense right, policy wrong |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let count = |f: fn(bool, bool) -> bool| {
            r.correct
                .iter()
                .zip(&r.dense_correct)
                .filter(|(&a, &b)| f(a, b))
                .count()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0}% | {:.0}% | {} | {} |",
            r.policy.replace('|', "\\|"),
            r.cases.len(),
            100.0 * r.accuracy(),
            100.0 * r.dense_accuracy(),
            count(|a, b| a && !b),
            count(|a, b| !a && b),
        );
    }
    out
}

/// Where attention mass goes, one markdown table per diagnosed row: a line
/// per (layer, kv head) and a last line of means. `top` is the diagnosis'
/// safety-set size.
pub fn head_tables(rows: &[Row], top: usize) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.per_head.is_empty()) {
        let _ = writeln!(
            out,
            "\nWhere attention mass goes, {} at {} tokens (fractions of each head's softmax, \
             mean over query heads and positions; LSH's expected miss under its (K, L, t))\n",
            r.policy.replace('|', "\\|"),
            r.context
        );
        let _ = writeln!(
            out,
            "| layer | kv head | offloaded | beyond top {top} | LSH missed | LSH missed, top {top} exact | missed keys' norm rank | missed keys' cos |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let line = |out: &mut String, layer: &str, head: &str, h: &HeadRow| {
            let _ = writeln!(
                out,
                "| {layer} | {head} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
                h.offloaded_mass,
                h.tail_mass,
                h.lsh_missed,
                h.lsh_missed_with_top,
                h.missed_norm_rank,
                h.missed_cos
            );
        };
        for h in &r.per_head {
            line(&mut out, &h.layer.to_string(), &h.kv_head.to_string(), h);
        }
        let n = r.per_head.len() as f64;
        let mean = |f: fn(&HeadRow) -> f64| r.per_head.iter().map(f).sum::<f64>() / n;
        let all = HeadRow {
            offloaded_mass: mean(|h| h.offloaded_mass),
            tail_mass: mean(|h| h.tail_mass),
            lsh_missed: mean(|h| h.lsh_missed),
            lsh_missed_with_top: mean(|h| h.lsh_missed_with_top),
            missed_norm_rank: mean(|h| h.missed_norm_rank),
            missed_cos: mean(|h| h.missed_cos),
            ..HeadRow::default()
        };
        line(&mut out, "mean", "", &all);
    }
    out
}

/// The rows as a pretty-printed JSON array of objects.
pub fn to_json(rows: &[Row]) -> String {
    // A Vec of plain structs with string keys always serializes.
    serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into())
}

/// Plot geometry.
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 420.0;
const PANEL_W: f64 = 360.0;
const PANEL_H: f64 = 260.0;
const PANEL_TOP: f64 = 50.0;
const PANEL_LEFT: [f64; 2] = [80.0, 560.0];
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Values below this are drawn at it on a log axis (which has no zero): keys
/// touched by a policy that touches none, the KL of dense with itself.
const LOG_FLOOR: f64 = 1e-4;

/// An axis: maps values to [0, 1] of the panel, linearly or by decades.
#[derive(Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Scale {
    /// A decade-aligned log scale covering `values` (non-finite ones ignored), at
    /// least one decade wide and at least up to `at_least`.
    fn log_covering(values: impl Iterator<Item = f64>, at_least: f64) -> Scale {
        let (lo, hi) = values
            .filter(|v| v.is_finite())
            .map(|v| v.max(LOG_FLOOR).log10())
            .fold((at_least.log10(), at_least.log10()), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let hi = hi.ceil();
        Scale {
            lo: lo.floor().min(hi - 1.0),
            hi,
            log: true,
        }
    }

    /// Position of `v` from 0 (bottom, left) to 1 (top, right).
    fn frac(self, v: f64) -> f64 {
        let v = if self.log {
            v.max(LOG_FLOOR).log10()
        } else {
            v
        };
        (v - self.lo) / (self.hi - self.lo)
    }

    /// Tick values: every decade on a log scale, five steps on a linear one.
    fn ticks(self) -> Vec<f64> {
        if self.log {
            (self.lo as i32..=self.hi as i32)
                .map(|e| 10f64.powi(e))
                .collect()
        } else {
            (0..=4)
                .map(|i| self.lo + (self.hi - self.lo) * f64::from(i) / 4.0)
                .collect()
        }
    }
}

/// One panel of the plot: a quality measure on the y axis.
struct Panel {
    title: &'static str,
    y_label: &'static str,
    y: Scale,
    value: fn(&Row) -> f64,
}

/// A standalone SVG with two panels, top-1 agreement and mean KL (log scale)
/// against the fraction of keys touched (log scale), one line per policy family
/// (per family and context when the rows hold several contexts), with a legend.
pub fn svg_plot(rows: &[Row]) -> String {
    let contexts: BTreeSet<usize> = rows.iter().map(|r| r.context).collect();
    let mut series: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        let name = if contexts.len() > 1 {
            format!("{} @{}", r.family(), r.context)
        } else {
            r.family().to_string()
        };
        series.entry(name).or_default().push(r);
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.keys_touched_fraction.total_cmp(&b.keys_touched_fraction));
    }

    let x = Scale::log_covering(rows.iter().map(|r| r.keys_touched_fraction), 1.0);
    let top1_lo = rows
        .iter()
        .map(|r| r.top1_agreement)
        .filter(|y| y.is_finite())
        .fold(1.0f64, f64::min);
    let panels = [
        Panel {
            title: "Top-1 agreement with dense",
            y_label: "top-1 agreement",
            y: Scale {
                lo: ((top1_lo * 10.0).floor() / 10.0).clamp(0.0, 0.9),
                hi: 1.0,
                log: false,
            },
            value: |r| r.top1_agreement,
        },
        Panel {
            title: "Mean KL(dense || policy)",
            y_label: "mean KL (nats, log scale)",
            y: Scale::log_covering(rows.iter().map(|r| r.mean_kl), 0.01),
            value: |r| r.mean_kl,
        },
    ];

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let bottom = PANEL_TOP + PANEL_H;
    for (&left, panel) in PANEL_LEFT.iter().zip(&panels) {
        let px = |v: f64| left + x.frac(v) * PANEL_W;
        let py = |v: f64| bottom - panel.y.frac(v) * PANEL_H;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14">{}</text>"#,
            left + PANEL_W / 2.0,
            PANEL_TOP - 15.0,
            escape(panel.title)
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{PANEL_TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
        );
        for t in x.ticks() {
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{PANEL_TOP}" x2="{x:.1}" y2="{bottom}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}%</text>"##,
                bottom + 16.0,
                trim_float(100.0 * t),
                x = px(t),
            );
        }
        for t in panel.y.ticks() {
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + PANEL_W,
                left - 6.0,
                py(t) + 4.0,
                trim_float(t),
                y = py(t),
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">keys touched per query (log scale)</text>"#,
            left + PANEL_W / 2.0,
            bottom + 36.0
        );
        let (lx, ly) = (left - 55.0, PANEL_TOP + PANEL_H / 2.0);
        let _ = writeln!(
            svg,
            r#"<text x="{lx}" y="{ly}" text-anchor="middle" transform="rotate(-90 {lx} {ly})">{}</text>"#,
            escape(panel.y_label)
        );
        for (i, (name, points)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let finite: Vec<(f64, f64)> = points
                .iter()
                .filter(|r| (panel.value)(r).is_finite())
                .map(|r| (px(r.keys_touched_fraction), py((panel.value)(r))))
                .collect();
            let coords: Vec<String> = finite
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline data-series="{}" points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                escape(name),
                coords.join(" ")
            );
            for (x, y) in finite {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
                );
            }
        }
    }
    // Legend: one entry per series along the bottom, six to a line.
    for (i, name) in series.keys().enumerate() {
        let (x, y) = (
            PANEL_LEFT[0] + (i % 6) as f64 * 140.0,
            HEIGHT - 40.0 + (i / 6) as f64 * 18.0,
        );
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            x + 30.0,
            y + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A tick label: at most 4 significant digits, without trailing zeros.
fn trim_float(x: f64) -> String {
    let s = format!("{:.4}", x);
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Escapes text for SVG content and attributes.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        let row = |policy: &str, top1: f64, kl: f64, touched: f64| Row {
            model: "SmolLM2 135M Instruct".into(),
            policy: policy.into(),
            context: 8192,
            positions: 100,
            top1_agreement: top1,
            mean_kl: kl,
            max_kl: 4.0 * kl,
            ppl: 12.0 + kl,
            dense_ppl: 12.0,
            needle_cases: 20,
            needle_accuracy: Some(0.9),
            dense_needle_accuracy: Some(0.95),
            keys_touched_fraction: touched,
            blocks_scanned_fraction: 0.5,
            device_bytes_per_token: 4096.0,
            cpu_bytes_per_token: 8192.0,
            per_layer: vec![LayerRow {
                layer: 0,
                rel_l2_error: Some(0.1),
                cosine: Some(0.99),
                keys_touched_fraction: touched,
            }],
            offloaded_touched_fraction: touched / 2.0,
            per_head: vec![HeadRow {
                layer: 1,
                kv_head: 0,
                offloaded_mass: 0.4,
                tail_mass: 0.1,
                lsh_missed: 0.2,
                lsh_missed_with_top: 0.05,
                missed_norm_rank: 0.7,
                missed_cos: 0.1,
            }],
            needles: vec![NeedleScore {
                task: "multikey".into(),
                cases: 20,
                accuracy: 0.8,
                dense_accuracy: 0.9,
            }],
        };
        vec![
            row("dense", 1.0, 0.0, 1.0),
            row("topk:64", 0.91, 0.08, 0.008),
            row("topk:256", 0.96, 0.02, 0.031),
            row("lsh:K=8,L=75", 0.97, 0.015, 0.02),
            row("lsh:K=10,L=150", 0.98, 0.01, 0.03),
            row("window<64>&\"x\"", 0.6, f64::INFINITY, 0.0),
        ]
    }

    #[test]
    fn families() {
        let r = rows();
        let f: Vec<&str> = r.iter().map(Row::family).collect();
        assert_eq!(
            f,
            ["dense", "topk", "topk", "lsh", "lsh", "window<64>&\"x\""]
        );
    }

    #[test]
    fn markdown_has_a_header_and_a_line_per_row() {
        let rows = rows();
        let md = markdown_table(&rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 2 + rows.len());
        assert!(lines[0].starts_with("| policy | context | top-1 | mean KL"));
        assert!(lines[1].starts_with("|---|"));
        let cols = lines[0].matches('|').count();
        for (line, row) in lines[2..].iter().zip(&rows) {
            assert_eq!(line.matches('|').count(), cols, "{line}");
            assert!(line.starts_with(&format!("| {} | 8192 |", row.policy)));
        }
        assert!(lines[3].contains("| 91.00% |") && lines[3].contains("| 0.80% |"));
        assert!(lines[3].contains("| 90% | 95% |"));
        let empty = Row::new(
            "dense",
            1024,
            &Agreement {
                positions: 1,
                top1_agreement: 1.0,
                mean_kl: 0.0,
                max_kl: 0.0,
                ppl: 3.0,
                dense_ppl: 3.0,
            },
        );
        assert!(markdown_table(&[empty]).contains("| – | – |"));
    }

    #[test]
    fn per_layer_tables_have_a_line_per_layer_and_a_column_per_policy() {
        let mut rows = rows();
        rows[1].per_layer.push(LayerRow {
            layer: 3,
            rel_l2_error: Some(0.25),
            cosine: Some(0.9),
            keys_touched_fraction: 0.05,
        });
        rows[2].per_layer.clear();
        let md = per_layer_tables(&rows);
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines.len(), 2 + 2, "{md}");
        assert!(lines[0].starts_with("| layer | dense | topk:64 | lsh:K=8,L=75 |"));
        assert!(!lines[0].contains("topk:256"));
        assert!(
            lines[3].starts_with("| 3 | – | 0.2500 (5.0%) | – |"),
            "{md}"
        );
        assert!(per_layer_tables(&[]).is_empty());
    }

    #[test]
    fn json_parses_back_with_every_field() {
        let rows = rows();
        let json = to_json(&rows);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let array = value.as_array().unwrap();
        assert_eq!(array.len(), rows.len());
        for key in [
            "policy",
            "context",
            "top1_agreement",
            "mean_kl",
            "max_kl",
            "ppl",
            "dense_ppl",
            "positions",
            "needle_cases",
            "needle_accuracy",
            "dense_needle_accuracy",
            "keys_touched_fraction",
            "device_bytes_per_token",
            "cpu_bytes_per_token",
            "per_layer",
        ] {
            assert!(array.iter().all(|o| o.get(key).is_some()), "missing {key}");
        }
        assert_eq!(array[1]["policy"], "topk:64");
        assert_eq!(array[1]["top1_agreement"], 0.91);
        assert_eq!(array[1]["per_layer"][0]["cosine"], 0.99);
        assert!(array[5]["mean_kl"].is_null(), "infinite KL is null");
        let back: Vec<Row> = serde_json::from_str(&to_json(&rows[..5])).unwrap();
        assert_eq!(back, rows[..5]);
    }

    /// Checks every tag is closed in order, and returns the names of the opening tags.
    fn balanced_tags(xml: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut opened = Vec::new();
        let mut rest = xml;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            let text = &rest[..start];
            assert!(!text.contains('>'), "stray '>' in text: {text}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                let name = tag
                    .split_whitespace()
                    .next()
                    .expect("tag name")
                    .trim_end_matches('/');
                // Attribute values are quoted: an even number of quotes.
                assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
                opened.push(name.to_string());
                if !tag.ends_with('/') {
                    stack.push(name.to_string());
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty());
        opened
    }

    #[test]
    fn svg_is_well_formed_with_a_line_per_family_per_panel() {
        let svg = svg_plot(&rows());
        let tags = balanced_tags(&svg);
        assert_eq!(tags[0], "svg");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        let families = ["dense", "lsh", "topk", "window&lt;64&gt;&amp;&quot;x&quot;"];
        assert_eq!(
            tags.iter().filter(|t| *t == "polyline").count(),
            2 * families.len()
        );
        for f in families {
            assert_eq!(
                svg.matches(&format!("data-series=\"{f}\"")).count(),
                2,
                "{f}"
            );
            assert!(svg.contains(&format!(">{f}</text>")), "legend for {f}");
        }
        // Axis labels and decade ticks down to the smallest fraction (clamped 1e-4).
        assert!(svg.contains("keys touched per query (log scale)"));
        assert!(svg.contains(">top-1 agreement<") && svg.contains(">mean KL (nats, log scale)<"));
        for tick in [">0.01%<", ">0.1%<", ">1%<", ">10%<", ">100%<"] {
            assert!(svg.contains(tick), "tick {tick}");
        }
        // lsh is drawn in order of keys touched.
        let lsh = svg
            .lines()
            .find(|l| l.contains("data-series=\"lsh\""))
            .unwrap();
        let points: Vec<f64> = lsh
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(points.len(), 2);
        assert!(points[0] < points[1]);

        // Several contexts: a line per family and context.
        let mut more = rows();
        more.extend(rows().into_iter().map(|r| Row { context: 2048, ..r }));
        let svg = svg_plot(&more);
        balanced_tags(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2 * 2 * families.len());
        assert!(svg.contains("data-series=\"lsh @2048\""));
        // An empty report is still a valid picture.
        balanced_tags(&svg_plot(&[]));
    }

    #[test]
    fn scales_and_ticks() {
        let x = Scale::log_covering([0.02, 0.3, 0.0].into_iter(), 1.0);
        assert_eq!((x.lo, x.hi), (-4.0, 0.0), "0 is drawn at the floor 1e-4");
        assert_eq!(x.ticks(), [1e-4, 1e-3, 1e-2, 1e-1, 1.0]);
        assert!((x.frac(0.01) - 0.5).abs() < 1e-12);
        let kl = Scale::log_covering([0.013, f64::INFINITY].into_iter(), 0.01);
        assert_eq!((kl.lo, kl.hi), (-2.0, -1.0));
        let kl = Scale::log_covering(std::iter::empty(), 0.01);
        assert_eq!((kl.lo, kl.hi), (-3.0, -2.0));
        let lin = Scale {
            lo: 0.6,
            hi: 1.0,
            log: false,
        };
        assert!((lin.frac(0.8) - 0.5).abs() < 1e-12);
        assert_eq!(lin.ticks().len(), 5);
        assert_eq!(trim_float(0.0125), "0.0125");
        assert_eq!(trim_float(100.0), "100");
        assert_eq!(trim_float(0.01), "0.01");
        assert_eq!(trim_float(0.7000000001), "0.7");
    }
}
