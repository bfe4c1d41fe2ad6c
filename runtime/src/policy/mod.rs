//! The per-layer attention policy table: for every layer, how its attention is
//! computed and which of its keys stay on the dense device.
//!
//! A sparse layer keeps its first `sinks` tokens and its most recent `window`
//! tokens on the device; the tokens in between live in the CPU attention
//! workers' offloaded store (or, for `window`, are dropped). Contexts shorter
//! than `dense_below` tokens stay wholly on the device, exactly as `dense`.

mod layout;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use tandem_cpu::{KvDtype, LshIndexParams, Policy, PolicySpec, Softmax};

use crate::error::{Error, Result};
pub use layout::{Layout, Role};

/// How one layer attends.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerAttention {
    /// Exact attention over every token, all on the device.
    Dense,
    /// A window on the device; tokens leaving it are dropped. `size: None`
    /// keeps the table's sinks and recent window once the context reaches
    /// `dense_below`; `Some(W)` is a sliding window: every query attends its
    /// `W` most recent tokens (itself included) at any context, no sinks.
    Window { size: Option<usize> },
    /// Attends with layer `from`'s keys and values (an earlier layer that is
    /// not shared itself), as that layer attends them; holds none of its own.
    Shared { from: usize },
    /// Sinks and window on the device, the rest offloaded to the CPU workers
    /// and attended with `policy`.
    Offloaded {
        /// The CPU workers' policy.
        policy: Policy,
        /// The LSH index the policy needs, if any: the one source of its
        /// (K, L, t) for retrieval and the estimator alike.
        lsh: Option<LshIndexParams>,
        /// How the offloaded keys and values are stored.
        kv_dtype: KvDtype,
    },
}

/// One layer's row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPolicy {
    /// How the layer attends.
    pub attention: LayerAttention,
    /// The policy as written (`dense`, `lsh:k=10,l=150`, ...).
    pub name: String,
    /// How the layer's attention turns scores into softmax weights, on the
    /// CPU device's window and the CPU workers alike (`softmax=sas`).
    pub softmax: Softmax,
}

impl LayerPolicy {
    /// Parses `dense`, `window`, `window:w=W`, `shared:from=J`, `exact`,
    /// `lsh:k=K,l=L[,t=T][,max_keys=M][,vskip=S]`, `topk:k=N`, `oracle:budget=N`,
    /// `threshold:eps=E` or `threshold:b=B`; the offloading ones take
    /// `kbits=2|4|8|16|32` and `vbits=2|4|8|16`, how the offloaded keys and
    /// values are held ([`KvDtype`]: int codes, bf16, the default, or f32), and
    /// `softmax=sas[,sas_n=N]` (TurboAttention's SAS weights,
    /// [`tandem_kernels::sas`]). `exact` offloads like the sparse policies but
    /// attends every offloaded key exactly (the split step's reference: it
    /// must give dense's results), and takes the same storage and softmax;
    /// `dense` keeps the device's own precision and refuses a storage.
    pub fn parse(spec: &str) -> Result<LayerPolicy> {
        let spec = spec.trim();
        let kind = spec.split_once(':').map_or(spec, |(kind, _)| kind);
        let (attention, softmax) = match LAYER_KINDS.iter().find(|(name, _)| *name == kind) {
            Some((_, parse_kind)) => (parse_kind(spec)?, Softmax::Exact),
            None if kind == EXACT => exact(spec)?,
            None if tandem_cpu::policy_kinds().any(|k| k == kind) => offloaded(spec)?,
            None => {
                return Err(Error::InvalidRequest(format!(
                    "policy {spec:?}: unknown kind {kind:?} (kinds: {})",
                    policy_kinds().join(", ")
                )))
            }
        };
        Ok(LayerPolicy {
            attention,
            name: spec.to_string(),
            softmax,
        })
    }

    /// A layer the model itself trained with a sliding window of `size`.
    pub fn model_window(size: usize) -> LayerPolicy {
        LayerPolicy {
            attention: LayerAttention::Window { size: Some(size) },
            name: format!("window:w={size} (the model's local layers)"),
            softmax: Softmax::Exact,
        }
    }

    /// Whether the layer moves tokens off the device once the context
    /// reaches the table's `dense_below` (offloaded, or dropped).
    pub fn is_sparse(&self) -> bool {
        matches!(
            self.attention,
            LayerAttention::Window { size: None } | LayerAttention::Offloaded { .. }
        )
    }
}

/// Parses a policy string of one kind.
type KindParser = fn(&str) -> Result<LayerAttention>;

/// The kinds the table adds to the CPU engine's, with their parsers.
const LAYER_KINDS: [(&str, KindParser); 2] = [
    ("window", |spec| {
        Ok(LayerAttention::Window {
            size: match spec {
                "window" => None,
                _ => Some(one_number(spec, "window:w=")?),
            },
        })
    }),
    ("shared", |spec| {
        Ok(LayerAttention::Shared {
            from: one_number(spec, "shared:from=")?,
        })
    }),
];

/// The kind that offloads like the sparse policies but attends every
/// offloaded key exactly: the CPU engine's `dense`, over the store.
const EXACT: &str = "exact";

/// Every policy kind [`LayerPolicy::parse`] accepts, by name.
pub fn policy_kinds() -> Vec<&'static str> {
    let engine = tandem_cpu::policy_kinds();
    engine
        .chain(LAYER_KINDS.iter().map(|(name, _)| *name))
        .chain([EXACT])
        .collect()
}

/// A policy of the CPU engine's: dense on the device, else offloaded; and
/// its softmax. `dense` keeps every key on the device in the device's own
/// precision, so a quantized storage there is refused rather than ignored.
fn offloaded(spec: &str) -> Result<(LayerAttention, Softmax)> {
    let parsed = parse_spec(spec)?;
    let attention = if parsed.policy == Policy::Dense {
        if parsed.kv_dtype != KvDtype::BF16 {
            return Err(Error::InvalidRequest(format!(
                "policy {spec:?}: `dense` keeps its keys and values on the device, which holds \
                 them in bf16; `{EXACT}` with the same kbits/vbits offloads them to a store of \
                 that format and attends every one exactly"
            )));
        }
        LayerAttention::Dense
    } else {
        LayerAttention::Offloaded {
            policy: parsed.policy,
            lsh: parsed.lsh,
            kv_dtype: parsed.kv_dtype,
        }
    };
    Ok((attention, parsed.softmax))
}

/// `exact[:kbits=K,vbits=V,int2_heads=N,softmax=...]`: offloaded, every
/// offloaded key attended exactly over a store of that format.
fn exact(spec: &str) -> Result<(LayerAttention, Softmax)> {
    let parsed = PolicySpec::parse_as_dense(spec).map_err(invalid)?;
    let attention = LayerAttention::Offloaded {
        policy: Policy::Dense,
        lsh: None,
        kv_dtype: parsed.kv_dtype,
    };
    Ok((attention, parsed.softmax))
}

fn parse_spec(spec: &str) -> Result<PolicySpec> {
    spec.parse().map_err(invalid)
}

/// A policy string the CPU engine refused.
fn invalid(e: tandem_cpu::CpuError) -> Error {
    Error::InvalidRequest(e.to_string())
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The number of a one-parameter policy such as `window:w=1024`.
fn one_number(spec: &str, prefix: &str) -> Result<usize> {
    let bad = || {
        Error::InvalidRequest(format!(
            "policy {spec:?}: expected {prefix}N with N a positive integer"
        ))
    };
    let n: usize = spec
        .strip_prefix(prefix)
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if prefix.starts_with("window") && n == 0 {
        return Err(bad());
    }
    Ok(n)
}

/// The default policy of the sparse layers: LSH sampling (MagicPIG, K = 10,
/// L = 75, t = 2) beside a safety set of each head's 64 keys of largest
/// logit, found through the keys' sketch and attended exactly. On
/// SmolLM2 the safety set took the teacher-forced top-1 agreement with dense
/// at 4k from 95% (`lsh:k=10,l=150`, no safety set) to 99% and found every
/// needle; it also halves the tables (L 75 for 150).
pub const DEFAULT_POLICY: &str = "lsh:k=10,l=75,t=2,top=128,per=32";

/// The default bound of the fidelity check ([`PolicyTable::fidelity_check`]):
/// a sampled layer whose output strays more than this (mean relative L2
/// error against exact attention) attends exactly. SmolLM2's layers under
/// the default policy stay below 0.12 at 8k; Gemma 3's global layers, where
/// sampling fails, are at 0.26 and above.
pub const DEFAULT_FIDELITY_CHECK: f32 = 0.15;

/// What a user sets; [`PolicyConfig::resolve`] turns it into a [`PolicyTable`]
/// for a model's layer count. Also the format of a TOML policy file:
///
/// ```toml
/// policy = "lsh:k=10,l=75,t=2,top=128,per=32"   # every layer not named below
/// dense_layers = [0, 15]          # default: 0 and n_layers / 2
/// sinks = 4
/// window = 64
/// dense_below = 2048              # shorter contexts stay dense
/// layout = "ma-pairs"             # optional: ma-pairs, ma-offset, one-in-six
/// layout_window = 1024            # the layout's sliding window
/// fidelity_check = 0.15           # 0 turns the check off
/// [layers]
/// 7 = "topk:k=64"                 # per-layer overrides
/// ```
///
/// With a `layout` ([`Layout`]), its global layers take `policy` (or
/// `shared:from=J`), its sliding layers `window:w=W` (or `shared:from=J`),
/// and `dense_layers` defaults to none.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Policy of every layer not otherwise named.
    pub policy: String,
    /// Layers kept dense; `None` means MagicPIG's choice, layers 0 and n/2.
    pub dense_layers: Option<Vec<usize>>,
    /// Tokens at the start of the context kept on the device.
    pub sinks: usize,
    /// Most recent tokens kept on the device.
    pub window: usize,
    /// Contexts shorter than this stay wholly on the device.
    pub dense_below: usize,
    /// Seed of the LSH hyperplanes.
    pub seed: u64,
    /// A MixAttention layout ([`Layout`]) by name.
    pub layout: Option<String>,
    /// The sliding window of the layout's sliding layers.
    pub layout_window: usize,
    /// The fidelity check's bound (see [`PolicyTable::fidelity_check`]).
    pub fidelity_check: f32,
    /// Per-layer policies, overriding everything above.
    pub layers: BTreeMap<usize, String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            policy: DEFAULT_POLICY.into(),
            dense_layers: None,
            sinks: 4,
            window: 64,
            dense_below: 2048,
            seed: 0x7a6d,
            layout: None,
            layout_window: 1024,
            fidelity_check: DEFAULT_FIDELITY_CHECK,
            layers: BTreeMap::new(),
        }
    }
}

impl PolicyConfig {
    /// Reads a TOML policy file (see the type's documentation).
    pub fn from_toml_file(path: &Path) -> Result<PolicyConfig> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses a TOML policy; errors name `origin` (the file) and the line and
    /// column of the problem.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<PolicyConfig> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or_else(String::new, |span| {
                let (line, column) = line_column(text, span.start);
                format!(", line {line}, column {column}")
            });
            Error::InvalidRequest(format!("policy file {origin}{at}: {}", e.message()))
        })
    }

    /// The table for a model whose layers have these trained sliding windows
    /// (`None` for a global layer; see `Config::sliding_windows`). A local
    /// layer attends its window whatever the policy says: naming it in
    /// `dense_layers` or `layers` is an error, and so is a layout.
    pub fn resolve(&self, windows: &[Option<usize>]) -> Result<PolicyTable> {
        let n_layers = windows.len();
        if self.layout.is_some() && windows.iter().any(Option::is_some) {
            return Err(Error::InvalidRequest(
                "the model has sliding-window layers of its own; a layout cannot be applied to it"
                    .into(),
            ));
        }
        let mut layers = self.base_layers(n_layers)?;
        let dense = match (&self.dense_layers, &self.layout) {
            (Some(d), _) => d.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => vec![0, n_layers / 2],
        };
        let mut set = |l: usize, spec: &str, what: &str| -> Result<()> {
            let slot = layers.get_mut(l).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "{what}layer {l} does not exist (the model has {n_layers})"
                ))
            })?;
            *slot = LayerPolicy::parse(spec)?;
            Ok(())
        };
        for &l in &dense {
            set(l, "dense", "dense ")?;
        }
        for (&l, spec) in &self.layers {
            set(l, spec, "")?;
        }
        let named = |l: usize| {
            self.layers.contains_key(&l)
                || self.dense_layers.as_ref().is_some_and(|d| d.contains(&l))
        };
        for (l, w) in windows.iter().enumerate() {
            if let Some(w) = *w {
                if named(l) {
                    return Err(Error::InvalidRequest(format!(
                        "layer {l} is one of the model's sliding-window layers ({w} tokens); \
                         its attention cannot be changed"
                    )));
                }
                layers[l] = LayerPolicy::model_window(w);
            }
        }
        check_shared(&layers)?;
        self.check_window(&layers)?;
        Ok(PolicyTable {
            layers,
            sinks: self.sinks,
            window: self.window,
            dense_below: self.dense_below,
            seed: self.seed,
            fidelity_check: self.fidelity_check,
        })
    }

    /// `policy` on every layer, or the layout's roles.
    fn base_layers(&self, n_layers: usize) -> Result<Vec<LayerPolicy>> {
        let global = LayerPolicy::parse(&self.policy)?;
        let Some(name) = &self.layout else {
            return Ok(vec![global; n_layers]);
        };
        let sliding = LayerPolicy::parse(&format!("window:w={}", self.layout_window))?;
        let shared = |from: usize| LayerPolicy::parse(&format!("shared:from={from}"));
        name.parse::<Layout>()?
            .roles(n_layers)
            .into_iter()
            .map(|role| match role {
                Role::Global => Ok(global.clone()),
                Role::Sliding => Ok(sliding.clone()),
                Role::GlobalShared { from } | Role::SlidingShared { from } => shared(from),
            })
            .collect()
    }

    /// Checks what needs no model: the policy strings, the layout, sinks and
    /// window, so that a mistake is told before a model loads.
    pub fn validate(&self) -> Result<()> {
        let mut layers = vec![LayerPolicy::parse(&self.policy)?];
        for spec in self.layers.values() {
            layers.push(LayerPolicy::parse(spec)?);
        }
        if let Some(name) = &self.layout {
            name.parse::<Layout>()?;
            LayerPolicy::parse(&format!("window:w={}", self.layout_window))?;
        }
        self.check_window(&layers)
    }

    fn check_window(&self, layers: &[LayerPolicy]) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        let any_sparse = layers.iter().any(LayerPolicy::is_sparse);
        let Some(kept) = self.sinks.checked_add(self.window) else {
            return bad(format!(
                "sinks ({}) + window ({}) is beyond any context",
                self.sinks, self.window
            ));
        };
        if any_sparse && self.dense_below < kept {
            return bad(format!(
                "dense_below ({}) must be at least sinks + window ({kept})",
                self.dense_below
            ));
        }
        if any_sparse && self.window == 0 {
            return bad("the window must hold at least one token".into());
        }
        if !(self.fidelity_check.is_finite() && self.fidelity_check >= 0.0) {
            return bad(format!(
                "fidelity_check ({}) must be a relative error of 0 or more (0 turns it off)",
                self.fidelity_check
            ));
        }
        Ok(())
    }
}

/// A shared layer's producer comes first and holds keys of its own.
fn check_shared(layers: &[LayerPolicy]) -> Result<()> {
    for (i, l) in layers.iter().enumerate() {
        let LayerAttention::Shared { from } = l.attention else {
            continue;
        };
        let problem = match layers.get(from).map(|p| &p.attention) {
            _ if from >= i => "it must be an earlier layer",
            Some(LayerAttention::Shared { .. }) => {
                "it is shared itself (name the layer that holds the keys)"
            }
            _ => continue,
        };
        return Err(Error::InvalidRequest(format!(
            "layer {i} shares layer {from}'s keys and values, but {problem}"
        )));
    }
    Ok(())
}

/// Every layer's policy, with the device window shared by the sparse layers.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyTable {
    /// One entry per layer.
    pub layers: Vec<LayerPolicy>,
    /// Tokens at the start of the context kept on the device.
    pub sinks: usize,
    /// Most recent tokens kept on the device.
    pub window: usize,
    /// Contexts shorter than this stay wholly on the device.
    pub dense_below: usize,
    /// Seed of the LSH hyperplanes.
    pub seed: u64,
    /// The bound of the fidelity check (`crate::split::LayerFidelity`): after
    /// new content, each sampled layer is probed against exact attention and
    /// attends exactly if its mean relative error exceeds this. `0`: off.
    pub fidelity_check: f32,
}

impl PolicyTable {
    /// Every layer dense but the model's own sliding-window layers (`windows`,
    /// see [`PolicyConfig::resolve`]): the plain decode.
    pub fn dense(windows: &[Option<usize>]) -> PolicyTable {
        PolicyTable {
            layers: windows
                .iter()
                .map(|w| match w {
                    Some(w) => LayerPolicy::model_window(*w),
                    None => LayerPolicy {
                        attention: LayerAttention::Dense,
                        name: "dense".into(),
                        softmax: Softmax::Exact,
                    },
                })
                .collect(),
            sinks: 0,
            window: 0,
            dense_below: usize::MAX,
            seed: 0,
            fidelity_check: 0.0,
        }
    }

    /// Whether any layer moves tokens off the device once the context
    /// reaches `dense_below`.
    pub fn is_sparse(&self) -> bool {
        self.layers.iter().any(LayerPolicy::is_sparse)
    }

    /// Whether the fidelity check is on and some layer is sampled.
    pub fn is_checked(&self) -> bool {
        self.fidelity_check > 0.0 && (0..self.layers.len()).any(|l| self.is_sampled(l))
    }

    /// Whether `layer` attends an offloaded store approximately (its own or
    /// its source's): the layers the fidelity check probes.
    pub fn is_sampled(&self, layer: usize) -> bool {
        let source = &self.layers[self.source(layer)].attention;
        matches!(source, LayerAttention::Offloaded { policy, .. } if *policy != Policy::Dense)
    }

    /// Checks the table against a model of `n_kv_heads` kv heads per layer:
    /// `int2_heads` may name at most that many (and chooses among at most 64).
    pub fn check_kv_heads(&self, n_kv_heads: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if let LayerAttention::Offloaded { kv_dtype, .. } = &l.attention {
                if !kv_dtype.int2_heads_fit(n_kv_heads) {
                    return Err(Error::InvalidRequest(format!(
                        "layer {i}: int2_heads={}, but the model has {n_kv_heads} kv heads per layer",
                        kv_dtype.int2_heads
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether any layer's store holds int4 or int2 rows.
    pub fn holds_packed_rows(&self) -> bool {
        self.layers.iter().any(|l| match l.attention {
            LayerAttention::Offloaded { kv_dtype, .. } => kv_dtype.holds_packed_rows(),
            _ => false,
        })
    }

    /// Whether any layer needs the CPU attention workers.
    pub fn needs_workers(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l.attention, LayerAttention::Offloaded { .. }))
    }

    /// The layer whose keys and values `layer` attends (itself unless shared).
    pub fn source(&self, layer: usize) -> usize {
        match self.layers[layer].attention {
            LayerAttention::Shared { from } => from,
            _ => layer,
        }
    }

    /// The softmax `layer` attends with (its source's: a shared layer
    /// attends as its producer does).
    pub fn softmax(&self, layer: usize) -> Softmax {
        self.layers[self.source(layer)].softmax
    }

    /// The sliding window `layer` attends with, if any (its source's).
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        match self.layers[self.source(layer)].attention {
            LayerAttention::Window { size } => size,
            _ => None,
        }
    }
}

/// One line per run of equal layers, e.g. `layers 0,15: dense`.
impl fmt::Display for PolicyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| *n == l.name) {
                Some((_, v)) => v.push(i),
                None => groups.push((&l.name, vec![i])),
            }
        }
        for (name, ids) in &groups {
            write!(f, "  layers {}: {name}", ranges(ids))?;
            if let LayerAttention::Offloaded { kv_dtype, .. } = &self.layers[ids[0]].attention {
                write!(f, " (keys {}, values {}", kv_dtype.keys, kv_dtype.values)?;
                match kv_dtype.int2_heads {
                    0 => write!(f, ")")?,
                    n => write!(f, "; int2 in the {n} kv heads of least key range × std)")?,
                }
            }
            writeln!(f)?;
        }
        if self.is_sparse() {
            write!(
                f,
                "  device window: {} sink + {} recent tokens; contexts below {} tokens stay dense",
                self.sinks, self.window, self.dense_below
            )?;
            if self.is_checked() {
                write!(
                    f,
                    "\n  fidelity check: a sampled layer's kv head whose output strays more \
                     than {} from exact attention attends exactly",
                    self.fidelity_check
                )?;
            }
        } else {
            write!(f, "  every layer on the device")?;
        }
        Ok(())
    }
}

/// `0,2-5,9` from sorted indices.
fn ranges(ids: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", ids[i], ids[j])
        } else {
            ids[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests;
