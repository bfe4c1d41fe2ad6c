//! The bytes of a session file: a checksummed JSON body, then (from version
//! 2) a table of binary arrays, each aligned to 64 bytes with its own CRC-32,
//! so that a large file is read through a memory map and checked array by
//! array.
//!
//! Layout (little-endian): the magic `TANDEMSS`, the version (u32), the
//! JSON's length (u64) and CRC-32 (u32), the JSON; version 2 goes on, at the
//! next multiple of 64, with the array count (u64), per array its offset
//! (u64), length (u64), CRC-32 (u32) and four zero bytes, the CRC-32 of the
//! table so far (u32), then the arrays, each at a multiple of 64 (zeros
//! between them, checked too), the file ending where the last one does.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use tandem_kernels::mem::MappedFile;

use crate::durable::write_atomically_with;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"TANDEMSS";
/// The version written; version 1 (a JSON body alone) is still read.
pub(crate) const VERSION: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 8 + 4;
const ENTRY_BYTES: usize = 8 + 8 + 4 + 4;
const ALIGN: usize = 64;
/// Larger JSON bodies are refused before they are read.
const MAX_JSON_BYTES: u64 = 1 << 30;

/// A session file, mapped, its checksums verified.
pub(crate) struct SessionFile {
    path: PathBuf,
    map: MappedFile,
    json: Range<usize>,
    arrays: Vec<Range<usize>>,
}

impl SessionFile {
    /// The JSON body.
    pub(crate) fn json(&self) -> &[u8] {
        &self.map[self.json.clone()]
    }

    /// The binary arrays (none in a version 1 file).
    pub(crate) fn arrays(&self) -> Vec<&[u8]> {
        self.arrays.iter().map(|r| &self.map[r.clone()]).collect()
    }

    /// A session-file error about this file.
    pub(crate) fn error(&self, problem: String) -> Error {
        Error::SessionFile {
            path: self.path.clone(),
            problem,
        }
    }
}

/// Writes a version 2 file of `json` and `arrays` crash-safely.
pub(crate) fn write(path: &Path, json: &[u8], arrays: &[Vec<u8>]) -> Result<()> {
    let write = |file: &mut File| -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&table_prefix(json, arrays))?;
        let mut at = table_end(json.len(), arrays.len());
        for array in arrays {
            let start = at.next_multiple_of(ALIGN);
            out.write_all(&vec![0u8; start - at])?;
            out.write_all(array)?;
            at = start + array.len();
        }
        out.flush()
    };
    write_atomically_with(path, write).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// Everything before the first array: header, JSON, padding, array table.
fn table_prefix(json: &[u8], arrays: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32(json).to_le_bytes());
    bytes.extend_from_slice(json);
    bytes.resize(bytes.len().next_multiple_of(ALIGN), 0);
    let table = bytes.len();
    bytes.extend_from_slice(&(arrays.len() as u64).to_le_bytes());
    let mut at = table_end(json.len(), arrays.len());
    for array in arrays {
        let start = at.next_multiple_of(ALIGN);
        bytes.extend_from_slice(&(start as u64).to_le_bytes());
        bytes.extend_from_slice(&(array.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32(array).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        at = start + array.len();
    }
    let crc = crc32(&bytes[table..]);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Where the table of `n` arrays after a JSON of `json` bytes ends.
fn table_end(json: usize, n: usize) -> usize {
    (HEADER_BYTES + json).next_multiple_of(ALIGN) + 8 + n * ENTRY_BYTES + 4
}

/// Maps `path` and checks its header, lengths and checksums.
pub(crate) fn read(path: &Path) -> Result<SessionFile> {
    let map = MappedFile::open(path).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut file = SessionFile {
        path: path.to_path_buf(),
        map,
        json: 0..0,
        arrays: Vec::new(),
    };
    let layout = Layout::read(&file.map).map_err(|p| file.error(p.to_string()))?;
    file.json = layout.json;
    file.arrays = layout.arrays;
    Ok(file)
}

/// Where a file's JSON and arrays lie.
struct Layout {
    json: Range<usize>,
    arrays: Vec<Range<usize>>,
}

const TRUNCATED: &str = "truncated or damaged (its length does not match)";
const DAMAGED: &str = "damaged (checksum mismatch)";

impl Layout {
    fn read(bytes: &[u8]) -> std::result::Result<Layout, String> {
        if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
            return Err("not a tandem session file".into());
        }
        let version = word(bytes, 8, 4).unwrap_or(0);
        if version != 1 && version != u64::from(VERSION) {
            return Err(format!(
                "format version {version}; this tandem reads versions 1 and {VERSION}"
            ));
        }
        let json_len = word(bytes, 12, 8).unwrap_or(u64::MAX);
        if json_len > MAX_JSON_BYTES {
            return Err(TRUNCATED.into());
        }
        let json = HEADER_BYTES..HEADER_BYTES + json_len as usize;
        let body = bytes.get(json.clone()).ok_or(TRUNCATED)?;
        if version == 1 && bytes.len() != json.end {
            return Err(TRUNCATED.into());
        }
        if word(bytes, 20, 4) != Some(u64::from(crc32(body))) {
            return Err(DAMAGED.into());
        }
        let table = json.end.next_multiple_of(ALIGN);
        let arrays = match version {
            1 => Vec::new(),
            _ if bytes
                .get(json.end..table)
                .is_some_and(|p| p.iter().any(|&b| b != 0)) =>
            {
                return Err(DAMAGED.into())
            }
            _ => read_table(bytes, table)?,
        };
        Ok(Layout { json, arrays })
    }
}

/// The arrays of the table at `table`, their bounds and checksums checked.
fn read_table(bytes: &[u8], table: usize) -> std::result::Result<Vec<Range<usize>>, String> {
    let n = word(bytes, table, 8).ok_or(TRUNCATED)?;
    let room = (bytes.len().saturating_sub(table + 12) / ENTRY_BYTES) as u64;
    if n > room {
        return Err(TRUNCATED.into());
    }
    let entries = table + 8;
    let end = entries + n as usize * ENTRY_BYTES;
    if word(bytes, end, 4) != Some(u64::from(crc32(&bytes[table..end]))) {
        return Err(DAMAGED.into());
    }
    let mut arrays = Vec::with_capacity(n as usize);
    let mut at = end + 4;
    for e in (entries..end).step_by(ENTRY_BYTES) {
        let field = |o: usize, w: usize| word(bytes, e + o, w).unwrap_or(u64::MAX);
        let (offset, len) = (field(0, 8), field(8, 8));
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?))
            .filter(|r| r.start >= at && r.start % ALIGN == 0)
            .ok_or("damaged (an array overlaps another)")?;
        let array = bytes.get(range.clone()).ok_or(TRUNCATED)?;
        let padding = &bytes[at..range.start];
        if field(16, 4) != u64::from(crc32(array)) || padding.iter().any(|&b| b != 0) {
            return Err(DAMAGED.into());
        }
        at = range.end;
        arrays.push(range);
    }
    if at != bytes.len() {
        return Err(TRUNCATED.into());
    }
    Ok(arrays)
}

/// The `width`-byte little-endian word at `at`, if the file holds it.
fn word(bytes: &[u8], at: usize, width: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(width)?)?;
    let mut word = [0u8; 8];
    word[..width].copy_from_slice(field);
    Some(u64::from_le_bytes(word))
}

/// CRC-32 (IEEE 802.3, as zlib and PNG use).
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_version_1_file_is_read() {
        let path = std::env::temp_dir().join(format!("tandem-v1-{}.bin", std::process::id()));
        let json = b"{\"tokens\":[1,2]}";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32(json).to_le_bytes());
        bytes.extend_from_slice(json);
        std::fs::write(&path, &bytes).expect("write");
        let file = read(&path).expect("read");
        assert_eq!(file.json(), json);
        assert!(file.arrays().is_empty());
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write");
        assert!(read(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn arrays_come_back_aligned_and_damage_is_refused() {
        let path = std::env::temp_dir().join(format!("tandem-file-{}.bin", std::process::id()));
        let arrays = vec![vec![1u8, 2, 3], Vec::new(), vec![9u8; 100]];
        write(&path, b"{\"a\":1}", &arrays).expect("write");
        let file = read(&path).expect("read");
        assert_eq!(file.json(), b"{\"a\":1}");
        assert_eq!(
            file.arrays(),
            arrays.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        assert!(file.arrays.iter().all(|r| r.start % ALIGN == 0));

        let bytes = std::fs::read(&path).expect("bytes");
        for (cut, problem) in [(bytes.len() - 1, "truncated"), (40, "truncated")] {
            std::fs::write(&path, &bytes[..cut]).expect("write");
            let err = read(&path).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(problem), "{err}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 5;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).expect("write");
        let err = read(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("checksum"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
