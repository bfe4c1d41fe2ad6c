//! A reader for GGUF files (the llama.cpp model format), memory-mapped.
//!
//! Only the container is parsed here: metadata and tensor descriptions. Turning
//! tensors into weights is the job of [`crate::model::weights`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tandem_kernels::mem::MappedFile;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// The fewest bytes a metadata entry takes: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes a tensor description takes: name length, dimension count,
/// one dimension, type and offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// The most entries reserved ahead from a count the file states.
const PREALLOCATE_MAX: u64 = 1 << 16;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The element type of a tensor, as ggml numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// A type tandem does not read; the number is ggml's.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// (elements per block, bytes per block), or `None` for a type tandem does not read.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Other(_) => return None,
        })
    }

    /// ggml's name for the type.
    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::BF16 => "BF16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Other(id) => format!("ggml type #{id}"),
        }
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the length of a row (the fastest-moving index).
    pub dims: Vec<u64>,
    /// The element type.
    pub dtype: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes (0 for a type tandem does not read).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: its metadata, its tensor table and a memory map of its data.
pub struct GgufFile {
    path: PathBuf,
    mmap: MappedFile,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: its header, metadata and tensor table, and
    /// that every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let mmap = super::map_file(&path)?;
        let Header { metadata, tensors } =
            parse_header(&mmap).map_err(|problem| Error::bad_model(&path, problem))?;
        Ok(GgufFile {
            path,
            mmap,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer, with a clear error when absent or mistyped.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            Error::bad_model(
                &self.path,
                format!("metadata `{key}` is missing or not an unsigned integer"),
            )
        })
    }

    /// An optional float.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// An optional string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (validated at open to lie inside the file).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = info.offset as usize;
        &self.mmap[start..start + info.n_bytes as usize]
    }
}

/// A cursor over the file's bytes; every read checks the bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "file ends at byte {} while reading {what} (truncated or not a GGUF file)",
                self.bytes.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| format!("{what}: length {len} is too large"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value, String> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 4 {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem_type = self.u32(key)?;
                let count = self.u64(key)?;
                let remaining = (self.bytes.len() - self.pos) as u64;
                if count.saturating_mul(min_value_bytes(elem_type)) > remaining {
                    return Err(format!(
                        "metadata `{key}`: array of {count} elements cannot fit in the file (truncated?)"
                    ));
                }
                // Parsed values are larger than their bytes: grow as they are read.
                let mut items = Vec::with_capacity(count.min(PREALLOCATE_MAX) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("metadata `{key}` has unknown value type {other}")),
        })
    }
}

/// The fewest bytes a value of GGUF type `type_id` takes in the file.
fn min_value_bytes(type_id: u32) -> u64 {
    match type_id {
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// A GGUF file's metadata and tensor table.
#[derive(Debug, Clone)]
pub struct Header {
    /// All metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// All tensors, in file order, each validated to lie inside the file.
    pub tensors: Vec<TensorInfo>,
}

/// Parses and validates the header of a GGUF file held in `bytes` (the whole
/// file: tensor data is checked to lie inside it). The error is the problem,
/// in words; [`GgufFile::open`] adds the path.
pub fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r
        .take(4, "the file magic")
        .map_err(|_| "not a GGUF file: too short".to_string())?;
    if magic != MAGIC {
        return Err("not a GGUF file: it does not start with the bytes `GGUF`".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    let limit = bytes.len() as u64;
    let least = tensor_count
        .saturating_mul(MIN_TENSOR_BYTES)
        .saturating_add(kv_count.saturating_mul(MIN_KV_BYTES));
    if least > limit - r.pos as u64 {
        return Err(format!(
            "header counts ({tensor_count} tensors, {kv_count} metadata entries) cannot fit in the file of {limit} bytes (corrupt or truncated)"
        ));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let type_id = r.u32(&key)?;
        let value = r.value(type_id, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata `{key}` appears twice"));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };

    let mut infos = Vec::with_capacity(tensor_count.min(PREALLOCATE_MAX) as usize);
    let mut names = BTreeSet::new();
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to 4 expected)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let dtype = GgmlType::from_id(r.u32(&name)?);
        let rel_offset = r.u64(&name)?;
        infos.push((name, dims, dtype, rel_offset));
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, dtype, rel_offset) in infos {
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} overflow"))?;
        let n_bytes = match dtype.block_layout() {
            Some((block, block_bytes)) => {
                if dims[0] % block as u64 != 0 {
                    return Err(format!(
                        "tensor `{name}`: row length {} is not a multiple of the {} block size {block}",
                        dims[0],
                        dtype.name()
                    ));
                }
                (n_elements / block as u64)
                    .checked_mul(block_bytes as u64)
                    .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} overflow"))?
            }
            None => 0,
        };
        if rel_offset % alignment != 0 {
            return Err(format!(
                "tensor `{name}`: data offset {rel_offset} is not a multiple of the alignment {alignment}"
            ));
        }
        let offset = data_start
            .checked_add(rel_offset)
            .ok_or_else(|| format!("tensor `{name}`: offset overflows"))?;
        if offset.checked_add(n_bytes).is_none_or(|end| end > limit) {
            return Err(format!(
                "tensor `{name}` ({} bytes at offset {offset}) runs past the end of the file ({limit} bytes): the file is truncated",
                n_bytes
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            n_bytes,
        });
    }
    Ok(Header { metadata, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A minimal GGUF with one metadata key and one F32 tensor of 4 elements.
    fn tiny_gguf() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        push_str(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        push_str(&mut b, "llama");
        push_str(&mut b, "t");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for x in [1.0f32, 2.0, 3.0, 4.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_a_minimal_file() {
        let Header {
            metadata: meta,
            tensors,
        } = parse_header(&tiny_gguf()).expect("parses");
        assert_eq!(meta["general.architecture"].as_str(), Some("llama"));
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].n_bytes, 16);
        assert_eq!(tensors[0].offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny_gguf();
        for len in 0..full.len() {
            assert!(
                parse_header(&full[..len]).is_err(),
                "prefix of {len} bytes was accepted"
            );
        }
    }

    #[test]
    fn knows_ggml_type_ids_and_block_layouts() {
        // (id, name, elements per block, bytes per block), as ggml defines them.
        for (id, name, block, bytes) in [
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (3, "Q4_1", 32, 20),
            (6, "Q5_0", 32, 22),
            (7, "Q5_1", 32, 24),
            (8, "Q8_0", 32, 34),
            (12, "Q4_K", 256, 144),
            (13, "Q5_K", 256, 176),
            (14, "Q6_K", 256, 210),
            (30, "BF16", 1, 2),
        ] {
            let t = GgmlType::from_id(id);
            assert_eq!(t.name(), name, "id {id}");
            assert_eq!(t.block_layout(), Some((block, bytes)), "{name}");
        }
        assert_eq!(GgmlType::from_id(10), GgmlType::Other(10));
        assert_eq!(GgmlType::Other(10).block_layout(), None);
    }

    /// A GGUF of `n_kv` string metadata entries `k0`, `k1`, ... and F32
    /// tensors `(name, elements, offset)`, with 64 bytes of data.
    fn gguf_with(keys: &[&str], tensors: &[(&str, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for key in keys {
            push_str(&mut b, key);
            b.extend_from_slice(&8u32.to_le_bytes());
            push_str(&mut b, "v");
        }
        for (name, elements, offset) in tensors {
            push_str(&mut b, name);
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&elements.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32) + 64, 0);
        b
    }

    #[test]
    fn header_counts_beyond_the_file_fail_before_parsing() {
        let mut b = gguf_with(&[], &[]);
        let near_size = b.len() as u64 - 30;
        b[8..16].copy_from_slice(&near_size.to_le_bytes());
        let err = parse_header(&b).unwrap_err();
        assert!(err.contains("cannot fit in the file"), "{err}");
        let mut b = gguf_with(&[], &[]);
        b[16..24].copy_from_slice(&near_size.to_le_bytes());
        let err = parse_header(&b).unwrap_err();
        assert!(err.contains("cannot fit in the file"), "{err}");
    }

    #[test]
    fn an_array_count_is_checked_against_its_elements_size() {
        let mut b = gguf_with(&["k"], &[]);
        // Turn `k` into an array of u64 with more elements than the file holds eights.
        let at = 24 + 8 + 1;
        b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
        b.splice(
            at + 4..at + 4,
            [10u32.to_le_bytes().as_slice(), &40u64.to_le_bytes()].concat(),
        );
        let err = parse_header(&b).unwrap_err();
        assert!(err.contains("array of 40 elements cannot fit"), "{err}");
    }

    #[test]
    fn duplicate_names_are_errors_naming_them() {
        let b = gguf_with(&[], &[("blk.0.w", 4, 0), ("blk.0.w", 4, 32)]);
        let err = parse_header(&b).unwrap_err();
        assert!(err.contains("tensor `blk.0.w` appears twice"), "{err}");
        let b = gguf_with(&["general.name", "general.name"], &[]);
        let err = parse_header(&b).unwrap_err();
        assert!(
            err.contains("metadata `general.name` appears twice"),
            "{err}"
        );
    }

    #[test]
    fn a_tensor_too_large_to_count_in_bytes_is_an_error() {
        let err = parse_header(&gguf_with(&[], &[("t", u64::MAX - 3, 0)])).unwrap_err();
        assert!(
            err.contains("tensor `t`: dimensions [18446744073709551612] overflow"),
            "{err}"
        );
    }

    #[test]
    fn a_misaligned_data_offset_is_an_error_naming_the_tensor() {
        assert!(parse_header(&gguf_with(&[], &[("a", 4, 0), ("b", 4, 32)])).is_ok());
        let err = parse_header(&gguf_with(&[], &[("a", 4, 0), ("b", 4, 20)])).unwrap_err();
        assert!(
            err.contains("tensor `b`: data offset 20 is not a multiple of the alignment 32"),
            "{err}"
        );
    }

    #[test]
    fn rejects_wrong_magic_and_version() {
        let mut b = tiny_gguf();
        b[0] = b'X';
        assert!(parse_header(&b).unwrap_err().contains("not a GGUF file"));
        let mut b = tiny_gguf();
        b[4] = 9;
        assert!(parse_header(&b).unwrap_err().contains("version 9"));
    }
}
