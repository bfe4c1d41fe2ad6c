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
            // A name with a line break must not end the comment.
            let _ = writeln!(out, "# {}", line.replace(['\n', '\r'], " "));
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
                self.text, self.span.0, self.span.1, self.seed
            ),
            format!(
                "context: {} tokens; the last {} decoded, their queries compared, the last {} of them repeating tokens {}..{}",
                self.span.1 - self.span.0 + self.recalled.1 - self.recalled.0,
                self.queries,
                self.recalled.1 - self.recalled.0,
                self.recalled.0,
                self.recalled.1
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
            "predicted error: {:.6} {} (largest {worst:.6}, layer {worst_layer})",
            p.mean_error(),
            self.objective.unit()
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
                format_bits(l.chosen.pair.mean_bits(self.plan.heads)),
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

/// Mean bits as `4` or `3.33`.
fn format_bits(bits: f64) -> String {
    let s = format!("{bits:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::pairs::{every_supported_pair, BitPair};
    use crate::calibrate::pareto::Candidate;
    use crate::calibrate::plan::choose;
    use tandem_runtime::policy::{LayerAttention, LayerPolicy};

    /// A calibration of a 6-layer model over every pair the store holds,
    /// layer 0 and 3 dense.
    fn calibration(base: &str) -> Calibration {
        let pairs: Vec<BitPair> = every_supported_pair(base)
            .into_iter()
            .filter(|p| p.mean_bits(2) <= 16.0)
            .collect();
        let measured: Vec<(usize, Vec<Candidate>)> = [1, 2, 4, 5]
            .iter()
            .map(|&l| {
                let errors = pairs
                    .iter()
                    .map(|&pair| {
                        let error = l as f64 / (f64::from(pair.key) * 4.0 + f64::from(pair.value));
                        Candidate::new(pair, error, 2)
                    })
                    .collect();
                (l, errors)
            })
            .collect();
        Calibration {
            plan: choose(&measured, 10.0, 2).expect("plan"),
            skipped: Vec::new(),
            dense_layers: vec![0, 3],
            base: PolicyConfig {
                policy: base.into(),
                ..PolicyConfig::default()
            },
            model: "test\nmodel".into(),
            text: "a text".into(),
            span: (10, 1030),
            recalled: (100, 104),
            queries: 8,
            seed: 3,
            objective: crate::calibrate::Objective::Kl,
        }
    }

    #[test]
    fn the_written_policy_loads_and_resolves_to_the_chosen_pairs() {
        let base = "topk:k=64";
        let c = calibration(base);
        let dir = std::env::temp_dir().join(format!("tandem-calibrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("policy.toml");
        write_atomically(&path, &c.to_toml()).expect("written");
        let config = PolicyConfig::from_toml_file(&path).expect("loads");
        assert_eq!(config, c.policy_config());
        let table = config.resolve(&[None; 6]).expect("resolves");
        for l in [0, 3] {
            assert_eq!(
                table.layers[l].attention,
                LayerAttention::Dense,
                "layer {l}"
            );
        }
        for l in &c.plan.layers {
            let expected = LayerPolicy::parse(&l.chosen.pair.policy_string(base)).expect("parses");
            assert_eq!(table.layers[l.layer], expected, "layer {}", l.layer);
            assert!(matches!(
                table.layers[l.layer].attention,
                LayerAttention::Offloaded { kv_dtype, .. }
                    if Ok(kv_dtype) == l.chosen.pair.kv_dtype(base)
            ));
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# Per-layer key/value bits"), "{text}");
        assert!(text.contains("# model: test model\n"), "{text}");
        assert!(text.contains("predicted error"), "{text}");
        assert!(text.contains("KL divergence"), "{text}");
        std::fs::remove_dir_all(&dir).expect("cleaned");
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_a_good_one_replaces_the_whole_file() {
        let dir = std::env::temp_dir().join(format!("tandem-calibrate-w-{}", std::process::id()));
        let missing = dir.join("no-such-dir").join("p.toml");
        assert!(check_writable(&missing).is_err());
        assert!(write_atomically(&missing, "x").is_err());
        assert!(!missing.exists());
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(check_writable(&dir).is_err(), "a directory");
        let path = dir.join("p.toml");
        std::fs::write(&path, "old and longer").expect("old");
        check_writable(&path).expect("writable");
        write_atomically(&path, "new").expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let left: Vec<_> = std::fs::read_dir(&dir).expect("list").collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
        std::fs::remove_dir_all(&dir).expect("cleaned");
    }
}
