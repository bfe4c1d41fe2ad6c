//! Tokenizer: text <-> token ids, built with the `tokenizers` crate either from
//! a GGUF file's embedded vocabulary or from a Hugging Face `tokenizer.json`.
//!
//! GGUF support covers `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the
//! pre-tokenizers `smollm`, `gpt2` (also the default when `tokenizer.ggml.pre` is
//! missing), `llama-bpe` and `qwen2`, and `tokenizer.ggml.model = "llama"` (SentencePiece
//! BPE with byte fallback, e.g. Llama 2 and Gemma 3; see `tokenizer/spm.rs`). Any other
//! `tokenizer.ggml.pre` value of a `gpt2` vocabulary is an error naming it (rather
//! than a silent fallback that would produce wrong ids); any other
//! `tokenizer.ggml.model` is an `Unsupported` error.

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::model::gguf::{GgufFile, Value};
use crate::{Error, Result};

mod spm;

/// Llama 3's pre-tokenizer regex (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (`tokenizer.ggml.pre = "qwen2"`): Llama 3's with digits split one by one.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of a byte-level BPE vocabulary by its GGUF name
/// (`tokenizer.ggml.pre`), as llama.cpp's `llama-vocab.cpp` and the models'
/// `tokenizer.json` define them; an unknown name is an error naming it.
fn byte_level_pre_tokenizer(
    pre: &str,
    add_prefix_space: bool,
) -> std::result::Result<PreTokenizerWrapper, String> {
    let regex_then_bytes = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(add_prefix_space, false, false).into(),
        ])
        .into())
    };
    match pre {
        "smollm" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(add_prefix_space, false, true).into(),
        ])
        .into()),
        "gpt2" | "default" => Ok(ByteLevel::new(add_prefix_space, false, true).into()),
        "llama-bpe" => regex_then_bytes(LLAMA3_PATTERN),
        "qwen2" => regex_then_bytes(QWEN2_PATTERN),
        other => Err(format!(
            "tokenizer pre-tokenizer {other:?} (supported: smollm, gpt2, llama-bpe, qwen2)"
        )),
    }
}

/// Token texts that end a chat turn when they exist in the vocabulary.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
];

/// GGUF `tokenizer.ggml.token_type` values (5 is unused, 6 byte).
const TOKEN_TYPE_UNDEFINED: i64 = 0;
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer with the model's special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    end_of_turn: Vec<u32>,
    add_bos: bool,
    /// One more than the largest id (cached: `get_vocab_size` clones the vocab).
    vocab_size: usize,
    coverage: Coverage,
}

/// Which characters a vocabulary cannot represent, checked before encoding so that
/// such text is refused rather than encoded with characters dropped or replaced.
#[derive(Clone)]
enum Coverage {
    /// Not checked (tokenizers loaded from `tokenizer.json`), or nothing is missing.
    Unchecked,
    /// A byte-level vocabulary without tokens for the marked bytes.
    ByteLevel(Box<[bool; 256]>),
    /// A SentencePiece vocabulary without `<0xNN>` tokens for the marked bytes: a
    /// character that is not itself a piece needs all its bytes.
    ByteFallback(Box<[bool; 256]>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// GPT-2's byte -> printable character map used by byte-level BPE vocabularies.
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    // Non-printable bytes are numbered from 256 upwards in byte order.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('\u{FFFD}')
}

fn get_id(meta: &BTreeMap<String, Value>, key: &str, n_vocab: usize) -> Option<u32> {
    let v = meta.get(key)?.as_u64()?;
    u32::try_from(v).ok().filter(|&id| (id as usize) < n_vocab)
}

impl Tokenizer {
    /// Builds the tokenizer embedded in a GGUF file (`tokenizer.ggml.*` metadata).
    ///
    /// Tokens of type control (3) and user-defined (4) become added tokens, so
    /// their text (e.g. `<|im_start|>`, `<start_of_turn>`) encodes to their single
    /// id.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        Tokenizer::from_metadata(file.path(), file.metadata())
    }

    /// Builds a tokenizer from GGUF `tokenizer.ggml.*` metadata, as
    /// [`Tokenizer::from_gguf`] does; `path` names the file in errors.
    pub fn from_metadata(path: &Path, meta: &BTreeMap<String, Value>) -> Result<Tokenizer> {
        let get_str = |key: &str| meta.get(key).and_then(Value::as_str);
        let model = get_str("tokenizer.ggml.model").unwrap_or("gpt2");
        match model {
            "gpt2" => {}
            "llama" => return Tokenizer::from_sentencepiece(path, meta),
            _ => {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "tokenizer model {model:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
                    ),
                ))
            }
        }
        let tokens = meta
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| Error::bad_model(path, "missing tokenizer.ggml.tokens"))?;
        let tokens: Vec<&str> = tokens
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::bad_model(path, "tokenizer.ggml.tokens is not a string array"))?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(Error::bad_model(
                path,
                "tokenizer.ggml.tokens has a bad length",
            ));
        }
        let types: Vec<i64> = match meta
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => Vec::new(),
        };
        let merges_v = meta
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.as_array())
            .ok_or_else(|| Error::bad_model(path, "missing tokenizer.ggml.merges"))?;
        let mut merges = Vec::with_capacity(merges_v.len());
        for m in merges_v {
            let (a, b) = m
                .as_str()
                .and_then(|s| s.split_once(' '))
                .ok_or_else(|| Error::bad_model(path, "tokenizer.ggml.merges has a bad entry"))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            // First occurrence wins on duplicates; ids are < u32::MAX (checked above).
            vocab.entry((*t).to_string()).or_insert(i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::bad_model(path, format!("tokenizer: {e}")))?;

        let add_prefix_space = matches!(
            meta.get("tokenizer.ggml.add_space_prefix"),
            Some(Value::Bool(true))
        );
        let pre = get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let pre_tokenizer = byte_level_pre_tokenizer(pre, add_prefix_space)
            .map_err(|problem| Error::unsupported(path, problem))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            match types.get(i).copied() {
                Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(t.to_string(), true)),
                Some(TOKEN_TYPE_USER_DEFINED) => {
                    user.push(AddedToken::from(t.to_string(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let n = tokens.len();
        let bos = get_id(meta, "tokenizer.ggml.bos_token_id", n);
        let eos: Vec<u32> = get_id(meta, "tokenizer.ggml.eos_token_id", n)
            .into_iter()
            .chain(get_id(meta, "tokenizer.ggml.eot_token_id", n))
            .collect();
        let add_bos = matches!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let mut unencodable = Box::new([false; 256]);
        for b in 0..=255u8 {
            unencodable[b as usize] = inner.token_to_id(&byte_to_char(b).to_string()).is_none();
        }
        let mut t = Tokenizer::assemble(inner, bos, eos, add_bos);
        t.coverage = Coverage::ByteLevel(unencodable);
        Ok(t)
    }

    /// A SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizer from GGUF metadata.
    fn from_sentencepiece(path: &Path, meta: &BTreeMap<String, Value>) -> Result<Tokenizer> {
        let parts = spm::build(path, meta)?;
        // Every added token is a piece of the vocabulary, so this is the size
        // without cloning the vocabulary to find its largest id.
        let vocab_size = parts
            .inner
            .get_added_vocabulary()
            .get_vocab()
            .values()
            .map(|&id| id as usize + 1)
            .fold(parts.n_vocab, usize::max);
        let mut t =
            Tokenizer::assemble_sized(parts.inner, parts.bos, parts.eos, parts.add_bos, vocab_size);
        if let Some(missing) = parts.missing_bytes {
            t.coverage = Coverage::ByteFallback(missing);
        }
        Ok(t)
    }

    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// BOS/EOS and `add_bos_token` are read from a sibling `tokenizer_config.json`
    /// (token strings) and then `config.json` (`bos_token_id`/`eos_token_id`) when
    /// present; override them with [`Tokenizer::with_special_ids`].
    pub fn from_json_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::BadModel {
            path: path.to_path_buf(),
            problem: format!("tokenizer: {e}"),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let read_json = |name: &str| -> Option<serde_json::Value> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        let token_str = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .into_iter()
                    .collect(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut bos = None;
        let mut eos = Vec::new();
        let mut add_bos = false;
        if let Some(cfg) = read_json("tokenizer_config.json") {
            bos = cfg
                .get("bos_token")
                .and_then(token_str)
                .and_then(|s| inner.token_to_id(&s));
            eos.extend(
                cfg.get("eos_token")
                    .and_then(token_str)
                    .and_then(|s| inner.token_to_id(&s)),
            );
            add_bos = cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        if let Some(cfg) = read_json("config.json") {
            if bos.is_none() {
                bos = ids(cfg.get("bos_token_id")).first().copied();
            }
            for id in ids(cfg.get("eos_token_id")) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Tokenizer::assemble(inner, bos, eos, add_bos))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
    ) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Tokenizer::assemble_sized(inner, bos, eos, add_bos, vocab_size)
    }

    fn assemble_sized(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        vocab_size: usize,
    ) -> Self {
        let mut t = Tokenizer {
            inner,
            bos,
            eos,
            end_of_turn: Vec::new(),
            add_bos,
            coverage: Coverage::Unchecked,
            vocab_size,
        };
        t.refresh_end_of_turn();
        t
    }

    fn refresh_end_of_turn(&mut self) {
        let mut stops = self.eos.clone();
        for s in END_OF_TURN_TOKENS {
            if let Some(id) = self.inner.token_to_id(s) {
                if !stops.contains(&id) {
                    stops.push(id);
                }
            }
        }
        self.end_of_turn = stops;
    }

    /// Replaces the BOS id and the EOS ids (e.g. from a model's `config.json`).
    /// Ids outside the vocabulary are dropped.
    pub fn with_special_ids(mut self, bos: Option<u32>, eos: Vec<u32>) -> Tokenizer {
        let n = self.vocab_size();
        self.bos = bos.filter(|&b| (b as usize) < n);
        self.eos = eos.into_iter().filter(|&e| (e as usize) < n).collect();
        self.refresh_end_of_turn();
        self
    }

    /// Encodes `text`; special-token text (e.g. `<|im_start|>`) becomes its id.
    /// Prepends the BOS id when `add_bos` is true and the model has one.
    ///
    /// For a GGUF byte-level vocabulary that lacks a token for some byte (SmolLM2
    /// has none for the control characters U+0004, U+0006, U+0013, U+0014, U+0016,
    /// U+001D, nor for lead bytes 0xF1/0xF2, i.e. the unassigned planes 4-11), text
    /// containing such a character is an error naming it, rather than being
    /// encoded with the character silently dropped. So `decode(encode(s)) == s`
    /// whenever `encode` succeeds. A SentencePiece vocabulary lacking some `<0xNN>`
    /// byte tokens likewise refuses a character that is not a piece and has such a
    /// byte. (Exceptions: a SentencePiece vocabulary writes spaces as `▁`, so a
    /// `▁` in the text decodes as a space; and one that prepends a space, such as
    /// Llama 2's, adds it to each stretch of text after a special token, as
    /// Hugging Face's tokenizers do.)
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        if let Some((pos, c)) = self.first_unencodable(text) {
            return Err(Error::Tokenizer(format!(
                "character {:?} (U+{:04X}) at byte {pos} cannot be encoded: the vocabulary has no token for one of its bytes",
                c, c as u32
            )));
        }
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    fn first_unencodable(&self, text: &str) -> Option<(usize, char)> {
        let mut buf = [0u8; 4];
        match &self.coverage {
            Coverage::Unchecked => None,
            Coverage::ByteLevel(bad) => text
                .char_indices()
                .find(|&(_, c)| c.encode_utf8(&mut buf).bytes().any(|b| bad[b as usize])),
            Coverage::ByteFallback(missing) => text.char_indices().find(|&(_, c)| {
                // Spaces reach the vocabulary as `▁`.
                let c = if c == ' ' { '\u{2581}' } else { c };
                let s = c.encode_utf8(&mut buf);
                self.inner.token_to_id(s).is_none() && s.bytes().any(|b| missing[b as usize])
            }),
        }
    }

    /// Decodes ids to text, special tokens included. An id outside the
    /// vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        let unknown = |id: u32| id as usize >= n || self.inner.id_to_token(id).is_none();
        if let Some(&bad) = ids.iter().find(|&&id| unknown(id)) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is not in the vocabulary (size {n})"
            )));
        }
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Number of token ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence ids from the model's metadata.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// True for an EOS id and for `<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`,
    /// `<end_of_turn>` when present in the vocabulary: generation should stop there.
    pub fn is_end_of_turn(&self, id: u32) -> bool {
        self.end_of_turn.contains(&id)
    }

    /// The vocabulary string of one token (byte-level encoded, e.g. `Ġthe`, or
    /// SentencePiece's, e.g. `▁the`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given its vocabulary string.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Whether the model asks for a BOS token at the start of a prompt.
    pub fn add_bos_by_default(&self) -> bool {
        self.add_bos
    }
}

/// Incremental detokenizer: turns generated ids into text as they arrive,
/// never splitting a multi-byte UTF-8 character across two pieces.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next piece.
    prefix: usize,
    /// End of the ids whose text was already returned.
    read: usize,
}

/// After this many held-back tokens, text ending in U+FFFD is emitted anyway.
const MAX_HELD_TOKENS: usize = 8;

impl<'a> TextStream<'a> {
    /// A stream with nothing in it yet.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn new_text(&self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let all = self.tokenizer.decode(&self.ids[self.prefix..])?;
        Ok(match all.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            None => all.get(before.len()..).unwrap_or("").to_string(),
        })
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.decode(&[id])?; // validates the id before it enters the buffer
        self.ids.push(id);
        let text = self.new_text()?;
        let held = self.ids.len() - self.read;
        if text.is_empty() || (text.ends_with('\u{FFFD}') && held < MAX_HELD_TOKENS) {
            return Ok(String::new());
        }
        // The ids just emitted become the context for the next piece.
        let old_read = self.read;
        self.ids.drain(..old_read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(text)
    }

    /// Returns any text still held back and empties the stream.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.new_text()?;
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    fn smollm() -> Tokenizer {
        assert!(
            Path::new(MODEL).exists(),
            "model file {MODEL} is missing: run scripts/setup.sh first"
        );
        let file = GgufFile::open(MODEL).expect("open model");
        Tokenizer::from_gguf(&file).expect("build tokenizer")
    }

    #[test]
    fn required_ids() {
        let t = smollm();
        let ids = t
            .encode("Hello, world! The capital of France is", false)
            .unwrap();
        assert_eq!(ids, [19556, 28, 905, 17, 378, 3575, 282, 4649, 314]);
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2]);
        assert!(!t.add_bos_by_default());
        assert_eq!(t.encode("Hi", true).unwrap()[0], 1);
    }

    /// Expected ids produced by the Python `tokenizers` package (PyPI) built
    /// independently from the GGUF vocab/merges read with `gguf-py`
    /// (see the report; the Python configuration was written separately).
    #[test]
    fn cases_match_python_tokenizers() {
        let t = smollm();
        for (text, expected) in EXPECTED {
            assert_eq!(&t.encode(text, false).unwrap(), expected, "text {text:?}");
        }
    }

    const EXPECTED: &[(&str, &[u32])] = &[
        (
            "Hello, world! The capital of France is",
            &[19556, 28, 905, 17, 378, 3575, 282, 4649, 314],
        ),
        ("   a  b    c", &[256, 253, 216, 278, 333, 265]),
        ("\u{a}\u{a}\u{a}x\u{a}", &[1116, 198, 104, 198]),
        ("line1\u{d}\u{a}line2", &[1311, 33, 201, 198, 1311, 34]),
        ("\u{9}\u{9}tab", &[197, 197, 15999]),
        ("12345", &[33, 34, 35, 36, 37]),
        (
            "3.14159 and 1,000,000",
            &[
                35, 30, 33, 36, 33, 37, 41, 284, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32,
            ],
        ),
        (
            "caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{c5}ngstr\u{f6}m",
            &[
                83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 5549, 223, 863, 1321, 45682,
            ],
        ),
        (
            "\u{65e5}\u{672c}\u{8a9e}\u{306e}\u{30c6}\u{30ad}\u{30b9}\u{30c8}",
            &[
                23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
                226,
            ],
        ),
        (
            "\u{4e2d}\u{6587}\u{6d4b}\u{8bd5}",
            &[28589, 29184, 43222, 229, 16313, 239],
        ),
        (
            "\u{1f980} Rust \u{1f680}\u{1f389}",
            &[10813, 116, 218, 36828, 15107, 244, 218, 10813, 232, 227],
        ),
        (
            "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}",
            &[
                10813, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117,
            ],
        ),
        (
            "<|im_start|>user\u{a}Hi<|im_end|>\u{a}",
            &[1, 4093, 198, 26843, 2, 198],
        ),
        ("<|im_start|>assistant\u{a}", &[1, 520, 9531, 198]),
        ("don't I'll we've", &[12420, 982, 339, 3060, 392, 3543]),
        (" leading space", &[2899, 1898]),
        ("trailing space ", &[4861, 4966, 1898, 216]),
        ("", &[]),
        ("\u{ff}\u{0}\u{7f}", &[142, 140, 190, 217]),
        (
            "\u{41f}\u{440}\u{438}\u{432}\u{435}\u{442} \u{43c}\u{438}\u{440}",
            &[155, 249, 46879, 16464, 32547, 41337, 7872, 9175],
        ),
        (
            "\u{645}\u{631}\u{62d}\u{628}\u{627}",
            &[21706, 20602, 44626, 31462, 10805],
        ),
    ];

    #[test]
    fn special_tokens_and_end_of_turn() {
        let t = smollm();
        let start = t.token_id("<|im_start|>").unwrap();
        let end = t.token_id("<|im_end|>").unwrap();
        assert_eq!(t.encode("<|im_start|>", false).unwrap(), [start]);
        let ids = t.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
        assert_eq!(ids.first(), Some(&start));
        assert_eq!(ids.last(), Some(&end));
        assert!(t.is_end_of_turn(end));
        assert!(t.is_end_of_turn(2));
        assert!(!t.is_end_of_turn(start));
    }

    #[test]
    fn qwen2_splits_digits_one_by_one_where_llama3_takes_three() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = |pre: &str| -> Vec<String> {
            let p = byte_level_pre_tokenizer(pre, false).expect("known");
            let mut s = PreTokenizedString::from("In 2024, it's 12345!");
            p.pre_tokenize(&mut s).expect("splits");
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect()
        };
        assert_eq!(
            pieces("qwen2"),
            ["In", "Ġ", "2", "0", "2", "4", ",", "Ġit", "'s", "Ġ", "1", "2", "3", "4", "5", "!"]
        );
        assert_eq!(
            pieces("llama-bpe"),
            ["In", "Ġ", "202", "4", ",", "Ġit", "'s", "Ġ", "123", "45", "!"]
        );
        assert!(byte_level_pre_tokenizer("qwen9", false).is_err());
    }

    #[test]
    fn decode_out_of_range_errors() {
        let t = smollm();
        assert!(t.decode(&[u32::MAX]).is_err());
        assert!(t.decode(&[t.vocab_size() as u32]).is_err());
        assert_eq!(t.vocab_size(), 49152);
        assert!(t.token_text(49152).is_none());
    }

    /// xorshift64*: a tiny PRNG so the test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_string(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            " ",
            "  ",
            "\n",
            "\t",
            "\r\n",
            "<|im_start|>",
            "<|im_end|>",
            "'s",
            "123",
            "é",
            "日本",
            "🦀",
            "Hello",
            "the",
            ".",
            "!!",
            "\u{200b}",
        ];
        let len = rng.below(40) as usize;
        let mut s = String::new();
        for _ in 0..len {
            match rng.below(4) {
                0 => s.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]),
                1 => s.push((b' ' + rng.below(95) as u8) as char),
                _ => {
                    // any scalar value, weighted towards smaller code points
                    let max = if rng.below(50) == 0 {
                        0x11_0000 // rarely any plane, incl. the unencodable planes 4-11
                    } else {
                        [0x80u64, 0x800, 0x1_0000, 0x4_0000][rng.below(4) as usize]
                    };
                    if let Some(c) = char::from_u32(rng.below(max) as u32) {
                        s.push(c);
                    }
                }
            }
        }
        s
    }

    #[test]
    fn round_trip_random_strings() {
        let t = smollm();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut rejected = 0;
        for _ in 0..3000 {
            let s = random_string(&mut rng);
            let Ok(ids) = t.encode(&s, false) else {
                // Only text with a byte the vocabulary cannot represent is refused.
                assert!(
                    s.chars().any(|c| {
                        matches!(
                            c as u32,
                            0x04 | 0x06 | 0x13 | 0x14 | 0x16 | 0x1D | 0x4_0000..=0xB_FFFF
                        )
                    }),
                    "{s:?}"
                );
                rejected += 1;
                continue;
            };
            assert_eq!(t.decode(&ids).unwrap(), s, "ids {ids:?}");
            // Streaming gives the same text, piece by piece.
            let mut stream = TextStream::new(&t);
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&stream.push(id).unwrap());
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(out, s, "stream ids {ids:?}");
        }
        assert!(
            rejected < 600,
            "most random strings must be encodable ({rejected})"
        );
    }

    #[test]
    fn unencodable_bytes_error() {
        let t = smollm();
        assert!(t.encode("a\u{14}b", false).is_err());
        assert!(t.encode("\u{940fb}", false).is_err());
        assert!(t.encode("\u{1F980}\u{FFFD}\u{10FFFF}", false).is_ok());
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
    }

    #[test]
    fn stream_never_splits_a_character() {
        let t = smollm();
        let ids = t.encode("🦀日本é", false).unwrap();
        assert!(
            ids.len() > 3,
            "multi-byte characters span several byte tokens"
        );
        let mut stream = TextStream::new(&t);
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = stream.push(id).unwrap();
            assert!(!p.contains('\u{FFFD}'));
            pieces.push(p);
        }
        pieces.push(stream.finish().unwrap());
        assert_eq!(pieces.concat(), "🦀日本é");
        assert!(stream.push(u32::MAX).is_err());
    }
}
