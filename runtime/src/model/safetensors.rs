//! Hugging Face model directories: `config.json` and `*.safetensors` weights.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, then `n` bytes
//! of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?}`,
//! then the tensor data; offsets are relative to the end of the header. Files are
//! memory-mapped and every entry is validated at open: its offsets lie inside the
//! file and its size is `product(shape) × dtype size`. Sharded checkpoints
//! (`model-00001-of-00002.safetensors`, ...) are simply all `*.safetensors` files in
//! the directory; a tensor name appearing in two files is an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;
use tandem_gpu::HostMatrix;
use tandem_kernels::mem::MappedFile;
use tandem_kernels::ops::Llama3Scaling;

use super::config::{Config, Family};
use crate::error::{Error, Result};

/// Element types of a safetensors tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    /// A type tandem does not load weights from (its name and element size).
    Other(&'static str, usize),
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::Other("F64", 8),
            "I64" => Dtype::Other("I64", 8),
            "U64" => Dtype::Other("U64", 8),
            "I32" => Dtype::Other("I32", 4),
            "U32" => Dtype::Other("U32", 4),
            "I16" => Dtype::Other("I16", 2),
            "U16" => Dtype::Other("U16", 2),
            "I8" => Dtype::Other("I8", 1),
            "U8" => Dtype::Other("U8", 1),
            "BOOL" => Dtype::Other("BOOL", 1),
            "F8_E4M3" => Dtype::Other("F8_E4M3", 1),
            "F8_E5M2" => Dtype::Other("F8_E5M2", 1),
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(_, s) => s,
        }
    }

    /// The safetensors name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(n, _) => n,
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub end: usize,
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: MappedFile,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates a safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let mmap = super::map_file(&path)?;
        let tensors = parse_header(&mmap).map_err(|p| Error::bad_model(&path, p))?;
        Ok(SafetensorsFile {
            path,
            mmap,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, by name.
    pub fn tensors(&self) -> &HashMap<String, TensorEntry> {
        &self.tensors
    }

    /// The raw bytes of a tensor (validated at open to lie inside the file).
    pub fn data(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[entry.start..entry.end]
    }
}

/// Parses and validates the header of a safetensors file held in `bytes` (the
/// whole file: every tensor's data is checked to lie inside it). The error is
/// the problem, in words; [`SafetensorsFile::open`] adds the path.
pub fn parse_header(bytes: &[u8]) -> Result<HashMap<String, TensorEntry>, String> {
    if bytes.len() < 8 {
        return Err(format!(
            "not a safetensors file: {} bytes, too short for the header length",
            bytes.len()
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let header_end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            format!(
                "header length {n} runs past the end of the file ({} bytes; truncated?)",
                bytes.len()
            )
        })?;
    let Entries(header) = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| format!("the header is not a JSON object: {e}"))?;
    let data_len = bytes.len() - header_end;
    let mut tensors = HashMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
        let dtype_str = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`dtype` is missing"))?;
        let dtype =
            Dtype::parse(dtype_str).ok_or_else(|| bad(&format!("unknown dtype `{dtype_str}`")))?;
        let shape = obj
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`shape` is missing"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("`shape` is not a list of sizes"))?;
        let offsets = obj
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| {
                Some((
                    usize::try_from(a[0].as_u64()?).ok()?,
                    usize::try_from(a[1].as_u64()?).ok()?,
                ))
            })
            .ok_or_else(|| bad("`data_offsets` is not [begin, end]"))?;
        let (begin, end) = offsets;
        if begin > end || end > data_len {
            return Err(bad(&format!(
                "data [{begin}, {end}) lies outside the {data_len} data bytes (truncated file?)"
            )));
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        if end - begin != expected {
            return Err(bad(&format!(
                "{} data bytes, but shape {shape:?} of {} needs {expected}",
                end - begin,
                dtype.name()
            )));
        }
        let entry = TensorEntry {
            dtype,
            shape,
            start: header_end + begin,
            end: header_end + end,
        };
        if tensors.insert(name.clone(), entry).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
    }
    Ok(tensors)
}

/// A JSON object's entries in file order, repeated keys kept (a map would
/// silently keep only the last).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// All `*.safetensors` files of a directory, with a name index over them.
#[derive(Debug)]
pub struct SafetensorsDir {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens every `*.safetensors` file in `dir` (in name order).
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            cause: source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.extension().is_some_and(|e| e == "safetensors") && p.is_file() {
                paths.push(p);
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(Error::bad_model(dir, "no *.safetensors weight files"));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for p in paths {
            let f = SafetensorsFile::open(&p)?;
            for name in f.tensors.keys() {
                if let Some(prev) = index.insert(name.clone(), files.len()) {
                    let prev: &SafetensorsFile = &files[prev];
                    return Err(Error::bad_model(
                        &p,
                        format!("tensor `{name}` is also in {}", prev.path.display()),
                    ));
                }
            }
            files.push(f);
        }
        Ok(SafetensorsDir { files, index })
    }

    /// A tensor by name, with the file holding it.
    pub fn tensor(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let f = &self.files[*self.index.get(name)?];
        Some((f, &f.tensors[name]))
    }

    fn require(&self, name: &str, shape: &[usize]) -> Result<(&SafetensorsFile, &TensorEntry)> {
        let (f, e) = self.tensor(name).ok_or_else(|| {
            let first = &self.files[0].path;
            let dir = first.parent().unwrap_or(first);
            Error::bad_model(dir, format!("tensor `{name}` is missing"))
        })?;
        if e.shape != shape {
            return Err(Error::bad_model(
                &f.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    e.shape
                ),
            ));
        }
        Ok((f, e))
    }

    /// A `[rows, cols]` weight as a host matrix: F32 and F16 as exact f32, BF16 as bf16.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<HostMatrix> {
        let (f, e) = self.require(name, &[rows, cols])?;
        let bytes = f.data(e);
        match e.dtype {
            Dtype::BF16 => Ok(HostMatrix::Bf16 {
                rows,
                cols,
                data: super::weights::bf16_from_le(bytes),
            }),
            _ => Ok(HostMatrix::F32 {
                rows,
                cols,
                data: floats(f, name, e)?,
            }),
        }
    }

    /// A vector of `len` floats.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (f, e) = self.require(name, &[len])?;
        floats(f, name, e)
    }
}

fn floats(f: &SafetensorsFile, name: &str, e: &TensorEntry) -> Result<Vec<f32>> {
    let b = f.data(e);
    Ok(match e.dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::Other(t, _) => {
            return Err(Error::unsupported(
                &f.path,
                format!("tensor `{name}` has dtype {t} (only F32, F16 and BF16 are supported)"),
            ))
        }
    })
}

/// Reads `config.json` of a Hugging Face Llama checkpoint directory.
pub fn read_hf_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        cause: if source.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "missing: a Hugging Face model directory needs config.json",
            )
        } else {
            source
        },
    })?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_model(&path, format!("not valid JSON: {e}")))?;
    let archs: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !archs.contains(&"LlamaForCausalLM") {
        return Err(Error::unsupported(
            &path,
            format!("architectures {archs:?} (only `LlamaForCausalLM` is supported)"),
        ));
    }
    let get = |k: &str| -> Result<usize> {
        json.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                Error::bad_model(
                    &path,
                    format!("`{k}` is missing or not an unsigned integer"),
                )
            })
    };
    let dim = get("hidden_size")?;
    let n_heads = get("num_attention_heads")?;
    let n_kv_heads = match json.get("num_key_value_heads") {
        None | Some(Value::Null) => n_heads,
        Some(_) => get("num_key_value_heads")?,
    };
    if n_heads == 0 || n_kv_heads == 0 || dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::bad_model(
            &path,
            format!("inconsistent head counts: dim {dim}, {n_heads} heads, {n_kv_heads} kv heads"),
        ));
    }
    let head_dim = dim / n_heads;
    if let Some(hd) = json.get("head_dim").and_then(Value::as_u64) {
        if hd as usize != head_dim {
            return Err(Error::unsupported(
                &path,
                format!(
                    "`head_dim` {hd} differs from hidden_size / num_attention_heads = {head_dim}"
                ),
            ));
        }
    }
    let float = |k: &str, default: Option<f64>| -> Result<f32> {
        match (json.get(k).and_then(Value::as_f64), default) {
            (Some(v), _) | (None, Some(v)) => Ok(v as f32),
            (None, None) => Err(Error::bad_model(
                &path,
                format!("`{k}` is missing or not a number"),
            )),
        }
    };
    let rope_base = float("rope_theta", Some(10000.0))?;
    let mut config = Config {
        name: dir
            .file_name()
            .map_or_else(|| "llama".into(), |n| n.to_string_lossy().into_owned()),
        n_layers: get("num_hidden_layers")?,
        dim,
        ffn_dim: get("intermediate_size")?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: get("vocab_size")?,
        rope_base,
        rope_factors: Vec::new(),
        rms_eps: float("rms_norm_eps", None)?,
        context_length: get("max_position_embeddings")?,
        family: Family::llama(),
        local: None,
    };
    config
        .validate()
        .map_err(|problem| Error::bad_model(&path, problem))?;
    // After validation: the factors' length is the (now bounded) head size.
    config.rope_factors = hf_rope_factors(&json, &path, head_dim, rope_base)?;
    Ok(config)
}

/// The RoPE frequency divisors of a `rope_scaling` entry: none, or Llama 3.1's
/// (`rope_type = "llama3"`, as `transformers`' `_compute_llama3_parameters`).
fn hf_rope_factors(json: &Value, path: &Path, head_dim: usize, base: f32) -> Result<Vec<f32>> {
    let scaling = match json.get("rope_scaling") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(s) => s,
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str);
    if kind != Some("llama3") {
        return Err(Error::unsupported(
            path,
            format!("`rope_scaling` {scaling}"),
        ));
    }
    let number = |k: &str| -> Result<f32> {
        match scaling.get(k).and_then(Value::as_f64) {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v as f32),
            _ => Err(Error::bad_model(
                path,
                format!("`rope_scaling.{k}` is missing or not a positive number"),
            )),
        }
    };
    let s = Llama3Scaling {
        factor: number("factor")?,
        low_freq_factor: number("low_freq_factor")?,
        high_freq_factor: number("high_freq_factor")?,
        original_context: number("original_max_position_embeddings")?,
    };
    if s.high_freq_factor <= s.low_freq_factor {
        return Err(Error::bad_model(
            path,
            "`rope_scaling.high_freq_factor` must exceed `low_freq_factor`",
        ));
    }
    Ok(s.factors(head_dim, base))
}

/// Permutes the rows of a Hugging Face q/k projection (half-split RoPE pairs) into
/// the interleaved layout of llama.cpp's converter, per head:
/// `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2)`, i.e. GGUF row
/// `h·hd + 2i + s` is HF row `h·hd + s·hd/2 + i`.
pub fn permute_qk(m: HostMatrix, n_head: usize) -> HostMatrix {
    fn perm<T: Copy>(data: &[T], rows: usize, cols: usize, n_head: usize) -> Vec<T> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = Vec::with_capacity(data.len());
        for h in 0..n_head {
            for i in 0..half {
                for s in 0..2 {
                    let src = h * hd + s * half + i;
                    out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }
    match m {
        HostMatrix::F32 { rows, cols, data } => HostMatrix::F32 {
            rows,
            cols,
            data: perm(&data, rows, cols, n_head),
        },
        HostMatrix::Bf16 { rows, cols, data } => HostMatrix::Bf16 {
            rows,
            cols,
            data: perm(&data, rows, cols, n_head),
        },
        other => other,
    }
}

/// The Hugging Face name of a weight named as in GGUF (`blk.3.attn_q.weight`).
pub fn hf_tensor_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let part = match rest.strip_suffix(".weight").unwrap_or(rest) {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.to_string(),
    };
    format!("model.layers.{layer}.{part}.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data_len, 0);
        b
    }

    #[test]
    fn a_tensor_named_twice_is_an_error_naming_it() {
        let one = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#;
        assert_eq!(
            parse_header(&file(one, 8)).expect("parses")["a"].end,
            8 + one.len() + 8
        );
        let twice = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#;
        let err = parse_header(&file(twice, 12)).unwrap_err();
        assert!(err.contains("tensor `a` appears twice"), "{err}");
    }
}
