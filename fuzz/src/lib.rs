//! The fuzz targets' bodies, one per parser: each takes any bytes and must
//! return, never panic, hang or exhaust memory, whatever they hold. The
//! libFuzzer binaries in `fuzz_targets/` call these, and the replay test
//! (`tests/tests/fuzz_replay.rs`) runs the committed inputs through them.

use std::path::Path;

use tandem_runtime::chat::{ChatTemplate, Message};
use tandem_runtime::model::{gguf, safetensors};
use tandem_runtime::policy::{LayerPolicy, PolicyConfig};
use tandem_runtime::tokenizer::Tokenizer;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: [(&str, Target); 5] = [
    ("gguf_header", gguf_header),
    ("safetensors_header", safetensors_header),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("policy", policy),
];

/// A GGUF file's header: metadata, tensor table and the data's bounds.
pub fn gguf_header(data: &[u8]) {
    let _ = gguf::parse_header(data);
}

/// A safetensors file's JSON header and the data's bounds.
pub fn safetensors_header(data: &[u8]) {
    let _ = safetensors::parse_header(data);
}

/// A tokenizer built from a GGUF header's `tokenizer.ggml.*` metadata, then
/// a round trip of some text through it.
pub fn tokenizer(data: &[u8]) {
    let Ok(header) = gguf::parse_header(data) else {
        return;
    };
    let Ok(tokenizer) = Tokenizer::from_metadata(Path::new("fuzz.gguf"), &header.metadata) else {
        return;
    };
    for text in ["Hello, world! 123", " <|im_start|>\u{e9}\u{1F600}\n\t", ""] {
        if let Ok(ids) = tokenizer.encode(text, true) {
            let _ = tokenizer.decode(&ids);
        }
    }
}

/// A chat template (the input up to its first NUL byte) rendering a short
/// conversation whose user message is the rest of the input.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (source, content) = text.split_once('\0').unwrap_or((&text, "Hi"));
    let Ok(template) = ChatTemplate::new(Some(source), "<s>", "</s>") else {
        return;
    };
    let messages = [
        Message::system("Be brief."),
        Message::user(content),
        Message::assistant("Hello."),
    ];
    let _ = template.render(&messages, true);
}

/// A policy string and a TOML policy file (the same text), resolved for a
/// model of eight layers, two of them sliding-window layers.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = LayerPolicy::parse(&text);
    if let Ok(config) = PolicyConfig::from_toml_str(&text, "fuzz.toml") {
        let windows = [None, Some(4), None, None, None, Some(4), None, None];
        if let Ok(table) = config.resolve(&windows) {
            let _ = table.to_string();
        }
        let _ = config.resolve(&[None; 8]);
    }
}
