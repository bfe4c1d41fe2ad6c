//! A calibration as a policy file `--policy-file` loads (the format of
//! `PolicyConfig`), as the table printed, and the file's crash-safe write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use tandem_runtime::policy::PolicyConfig;

use crate::calibrate::{CalibrateError, Calibration};

impl Calibration {
    /// The policy: the base, the dense layers named, and each offloaded
    /// layer's chosen pair in `[layers]`.
    pub fn policy_config(&self) -> PolicyConfig {
        let layers: BTreeMap<usize, String> = self
            .plan
            .layers
            .iter()
            .map(|l| (l.layer, l.chosen.pair.policy_string(&self.base.policy)))
            .collect();
        PolicyConfig {
            dense_layers: Some(self.dense_layers.clone()),
            layers,
            ..self.base.clone()
        }
    }

    /// The policy file's text, opening with comments that say what it was
    /// measured on and what it predicts.
    pub fn to_toml(&self) -> String {
        let c = self.policy_config();
        let mut out = String::new();
        for line in self.summary() {
            let _ = writeln!(out, "# {line}");
        }
        let _ = writeln!(out, "policy = {}", quoted(&c.policy));
        let dense: Vec<String> = self.dense_layers.iter().map(usize::to_string).collect();
        let _ = writeln!(out, "dense_layers = [{}]", dense.join(", "));
        let _ = writeln!(out, "sinks = {}", c.sinks);
        let _ = writeln!(out, "window = {}", c.window);
        let _ = writeln!(out, "dense_below = {}", c.dense_below);
        let _ = writeln!(out, "seed = {}", c.seed);
        let _ = writeln!(out, "\n[layers]");
        for (layer, spec) in &c.layers {
            let _ = writeln!(out, "{layer} = {}", quoted(spec));
        }
        out
    }

    /// What the calibration was run on and what it predicts, one line each.
    pub fn summary(&self) -> Vec<String> {
        let p = &self.plan;
        let measured: Vec<String> = p
            .layers
            .first()
            .map(|l| l.measured.iter().map(|c| c.pair.to_string()).collect())
            .unwrap_or_default();
        let mut lines = vec![
            "Per-layer key/value bits chosen by `tandem calibrate` (KVTuner's search).".into(),
            format!("model: {}", self.model),
            format!(
                "text: {}, tokens {}..{} (seed {})",
                self.text.replace('\n', " "),
                self.span.0,
                self.span.1,
                self.seed
            ),
            format!(
                "context: {} tokens; the last {} decoded, their queries compared",
                self.span.1 - self.span.0,
                self.queries
            ),
            format!("pairs measured: {}", measured.join(", ")),
        ];
        if !self.skipped.is_empty() {
            let skipped: Vec<String> = self.skipped.iter().map(|s| s.pair.to_string()).collect();
            lines.push(format!(
                "pairs skipped (the store does not hold them): {}",
                skipped.join(", ")
            ));
        }
        lines.push(format!(
            "budget: {} mean bits per offloaded key/value element; chosen: {:.3} over {} offloaded layers",
            p.budget_bits,
            p.mean_bits(),
            p.layers.len()
        ));
        let (worst_layer, worst) = p.max_error().unwrap_or((0, 0.0));
        lines.push(format!(
            "predicted error: {:.6} mean relative attention-output error per layer (largest {worst:.6}, layer {worst_layer})",
            p.mean_error()
        ));
        lines.push(format!(
            "dense layers {}: on the device in bf16, not calibrated",
            list(&self.dense_layers)
        ));
        lines
    }

    /// The chosen table, each layer's Pareto front, the groups and the summary.
    pub fn table(&self) -> String {
        let mut out =
            String::from("| layer | pair | mean bits | error | Pareto front (pair error) |\n");
        out.push_str("|---:|---|---:|---:|---|\n");
        for l in &self.plan.layers {
            let front: Vec<String> = l
                .front
                .iter()
                .map(|c| format!("{} {:.5}", c.pair, c.error))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.5} | {} |",
                l.layer,
                l.chosen.pair,
                l.chosen.pair.mean_bits(),
                l.chosen.error,
                front.join(", ")
            );
        }
        for (i, g) in self.plan.groups.iter().enumerate() {
            let pairs: Vec<String> = g.pairs.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "group {}: layers {}: front {{{}}}",
                i + 1,
                list(&g.layers),
                pairs.join(", ")
            );
        }
        for line in self.summary().iter().skip(1) {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(ids: &[usize]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The temporary file a policy file is written through, beside it.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CalibrateError + '_ {
    move |source| CalibrateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `path` can be written, before a long calibration: creates
/// and removes its temporary file.
pub fn check_writable(path: &Path) -> Result<(), CalibrateError> {
    if path.is_dir() {
        return Err(io(path)(std::io::Error::other("is a directory")));
    }
    let tmp = temporary(path);
    std::fs::File::create(&tmp).map_err(io(path))?;
    std::fs::remove_file(&tmp).map_err(io(&tmp))
}

/// Writes `text` to `path` through a temporary file in the same directory,
/// synced then renamed: `path` holds the old file or the whole new one.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), CalibrateError> {
    let tmp = temporary(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    Ok(())
}
