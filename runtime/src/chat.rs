//! Chat templates: turning a conversation into the prompt text a model expects.
//!
//! Templates are the Jinja sources Hugging Face models ship (`tokenizer.chat_template`
//! in GGUF, `chat_template` in `tokenizer_config.json`), rendered with `minijinja`.
//! Besides the Jinja builtins, templates get `tojson` (Hugging Face's: no HTML
//! escaping, an optional `indent`), `raise_exception(msg)`,
//! `strftime_now(format)` (UTC; `%Y %m %d %H %M %S %B %b %A %a %%`) and the common
//! Python string methods `strip`, `lstrip`, `rstrip`, `startswith`, `endswith`,
//! `upper`, `lower`, `title`, `replace`, `split`, and `get` on maps.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The template used when a model has none: ChatML, as used by SmolLM2, Qwen and
/// others: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` when a generation prompt is asked for.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The template of a base model, which has no chat format: the messages'
/// texts one after another, each followed by a blank line when a reply is to
/// follow, for the model to continue (completion-style prompts).
pub const COMPLETION_TEMPLATE: &str = "{% for message in messages %}{{ message['content'] }}{% if not loop.last or add_generation_prompt %}{{ '\n\n' }}{% endif %}{% endfor %}";

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person chatting.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role's name as templates see it (`"system"`, `"user"`, `"assistant"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What it says.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    completion: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat";

/// Template instructions one rendering may run: thousands of messages need
/// far fewer, and a template stuck in nested loops stops within a second.
const FUEL: u64 = 5_000_000;

/// The longest prompt a template may render: far beyond any context window
/// (a million tokens is a few megabytes of text).
pub const MAX_PROMPT_BYTES: usize = 64 << 20;

/// The rendered prompt, refusing to grow past [`MAX_PROMPT_BYTES`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_PROMPT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("prompt too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_err(e: minijinja::Error) -> Error {
    // Show the whole chain: minijinja puts the location and cause in sources.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Error::ChatTemplate(msg)
}

/// The deepest nesting of lists and maps a template may print or turn into a
/// string: printing walks values recursively, and a namespace holding itself
/// (`{% set ns.x = ns %}`) would otherwise overflow the stack.
const MAX_PRINTED_DEPTH: usize = 32;

/// The most values (of every level) a template may print at once.
const MAX_PRINTED_VALUES: usize = 100_000;

/// Refuses a value too deep or too large to print: the check walks at most
/// [`MAX_PRINTED_VALUES`] values, [`MAX_PRINTED_DEPTH`] levels deep.
fn check_printable(value: &Value) -> std::result::Result<(), minijinja::Error> {
    fn walk(value: &Value, depth: usize, budget: &mut usize) -> bool {
        if !matches!(value.kind(), ValueKind::Seq | ValueKind::Map) {
            return true;
        }
        if depth >= MAX_PRINTED_DEPTH {
            return false;
        }
        let Ok(items) = value.try_iter() else {
            return true;
        };
        let is_map = value.kind() == ValueKind::Map;
        for item in items {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let child = if is_map {
                value.get_item(&item).unwrap_or_default()
            } else {
                item
            };
            if !walk(&child, depth + 1, budget) {
                return false;
            }
        }
        true
    }
    let mut budget = MAX_PRINTED_VALUES;
    if walk(value, 0, &mut budget) {
        return Ok(());
    }
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "a value nested deeper than {MAX_PRINTED_DEPTH} levels or holding more than \
             {MAX_PRINTED_VALUES} values (one that holds itself?) cannot be printed"
        ),
    ))
}

/// Prints a value as minijinja does, once [`check_printable`] allows it.
fn bounded_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    check_printable(value)?;
    minijinja::escape_formatter(out, state, value)
}

/// The `string` filter, refusing what [`check_printable`] refuses.
fn bounded_string(value: Value) -> std::result::Result<Value, minijinja::Error> {
    check_printable(&value)?;
    Ok(match value.as_str() {
        Some(_) => value,
        None => Value::from(value.to_string()),
    })
}

/// The `tojson` filter (as Hugging Face defines it: no HTML escaping, an
/// optional `indent`), refusing what [`check_printable`] refuses.
fn bounded_tojson(
    value: Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = indent.or(kwargs.get::<Option<usize>>("indent")?);
    kwargs.assert_all_used()?;
    check_printable(&value)?;
    let json = match indent {
        None => serde_json::to_vec(&value),
        Some(n) => {
            let spaces = vec![b' '; n.min(16)];
            let mut out = Vec::new();
            let format = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, format);
            serde::Serialize::serialize(&value, &mut ser).map(|()| out)
        }
    };
    let invalid = |e: String| minijinja::Error::new(ErrorKind::InvalidOperation, e);
    let text = String::from_utf8(json.map_err(|e| invalid(e.to_string()))?)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Formats the current UTC time with a small strftime subset.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let month = MONTHS[((m - 1) as usize) % 12];
    let weekday = DAYS[(days.rem_euclid(7)) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn str_arg(args: &[Value], i: usize) -> Option<String> {
    args.get(i).and_then(|v| v.as_str()).map(str::to_string)
}

/// Python-style methods that HF templates call on strings and maps.
fn unknown_method(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || minijinja::Error::from(ErrorKind::UnknownMethod);
    if let Some(s) = value.as_str() {
        let chars = str_arg(args, 0);
        let set = |c: char| match &chars {
            Some(cs) => cs.contains(c),
            None => c.is_whitespace(),
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(set)),
            "lstrip" => Value::from(s.trim_start_matches(set)),
            "rstrip" => Value::from(s.trim_end_matches(set)),
            "startswith" => Value::from(chars.is_some_and(|p| s.starts_with(p.as_str()))),
            "endswith" => Value::from(chars.is_some_and(|p| s.ends_with(p.as_str()))),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" => {
                let mut out = String::with_capacity(s.len());
                let mut start = true;
                for c in s.chars() {
                    if start {
                        out.extend(c.to_uppercase());
                    } else {
                        out.extend(c.to_lowercase());
                    }
                    start = !c.is_alphanumeric();
                }
                Value::from(out)
            }
            "replace" => match (chars, str_arg(args, 1)) {
                (Some(from), Some(to)) if !from.is_empty() => Value::from(s.replace(&from, &to)),
                _ => return Err(unknown()),
            },
            "split" => match chars {
                Some(sep) if !sep.is_empty() => {
                    Value::from(s.split(sep.as_str()).map(Value::from).collect::<Vec<_>>())
                }
                _ => Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>()),
            },
            _ => return Err(unknown()),
        });
    }
    if method == "get" {
        if let Some(key) = args.first() {
            let v = value.get_item(key).unwrap_or(Value::UNDEFINED);
            return Ok(if v.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                v
            });
        }
    }
    Err(unknown())
}

impl ChatTemplate {
    /// Compiles a chat template. `None` uses the built-in ChatML template
    /// ([`CHATML_TEMPLATE`]). `bos_token`/`eos_token` are the texts templates see
    /// as `bos_token`/`eos_token`. A syntax error is an [`Error::ChatTemplate`].
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        Self::with_fallback(source, CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// As [`ChatTemplate::new`], with `fallback` when the model has no template.
    pub fn with_fallback(
        source: Option<&str>,
        fallback: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(unknown_method);
        env.set_formatter(bounded_formatter);
        env.add_filter("string", bounded_string);
        env.add_filter("tojson", bounded_tojson);
        let source = source.unwrap_or(fallback);
        let completion = source == COMPLETION_TEMPLATE;
        env.add_template_owned(NAME, source.to_string())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            completion,
        })
    }

    /// Whether prompts are plain completions (a base model without a chat
    /// format, [`COMPLETION_TEMPLATE`]).
    pub fn is_completion(&self) -> bool {
        self.completion
    }

    /// Renders a conversation; with `add_generation_prompt`, ends with the text
    /// that starts the assistant's reply. Template errors (including
    /// `raise_exception`) are [`Error::ChatTemplate`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(template_err)?;
        let mut out = BoundedOutput::default();
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
            &mut out,
        );
        match rendered {
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::ChatTemplate(format!(
                "the template ran more than {FUEL} instructions (a loop that does not end?)"
            ))),
            Err(_) if out.overflowed => Err(Error::ChatTemplate(format!(
                "the rendered prompt exceeds {MAX_PROMPT_BYTES} bytes"
            ))),
            Err(e) => Err(template_err(e)),
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| Error::ChatTemplate("the template rendered invalid UTF-8".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgufFile;

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    fn smollm_template() -> ChatTemplate {
        assert!(
            std::path::Path::new(MODEL).exists(),
            "model file {MODEL} is missing: run scripts/setup.sh first"
        );
        let file = GgufFile::open(MODEL).expect("open model");
        let source = file
            .get_str("tokenizer.chat_template")
            .expect("chat template");
        ChatTemplate::new(Some(source), "<|im_start|>", "<|im_end|>").expect("compile")
    }

    #[test]
    fn smollm2_template_system_user() {
        let t = smollm_template();
        let out = t
            .render(
                &[
                    Message::system("You are terse."),
                    Message::user("What is 2+2?"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_template_default_system() {
        let t = smollm_template();
        let out = t.render(&[Message::user("Hi")], false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let out = t
            .render(
                &[
                    Message::system("S"),
                    Message::user("U"),
                    Message::assistant("A"),
                    Message::user("V"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[Message::user("U")], false).unwrap();
        assert_eq!(out, "<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            Some("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"),
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[Message::system("x")], true).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)));
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(t.render(&[Message::user("x")], true).unwrap(), "ok");
    }

    #[test]
    fn base_models_get_completion_prompts() {
        let t = ChatTemplate::with_fallback(None, COMPLETION_TEMPLATE, "<bos>", "<eos>")
            .expect("template");
        let messages = [Message::user("Text."), Message::user("Question?")];
        assert_eq!(
            t.render(&messages, true).expect("render"),
            "Text.\n\nQuestion?\n\n"
        );
        assert_eq!(
            t.render(&messages, false).expect("render"),
            "Text.\n\nQuestion?"
        );
        assert!(t.is_completion());
        assert!(!smollm_template().is_completion());
    }

    #[test]
    fn malformed_template_is_an_error() {
        let err =
            ChatTemplate::new(Some("{% for m in messages %}{{ m.content }"), "", "").unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
        // Unknown function at render time is also a clean error.
        let t = ChatTemplate::new(Some("{{ no_such_fn() }}"), "", "").unwrap();
        assert!(matches!(t.render(&[], false), Err(Error::ChatTemplate(_))));
    }

    #[test]
    fn a_namespace_holding_itself_is_refused_not_printed() {
        for body in [
            "{{ ns }}",
            "{{ ns|string }}",
            "{{ ns|tojson }}",
            "{{ [ns] }}",
        ] {
            let source = format!("{{% set ns = namespace() %}}{{% set ns.x = ns %}}{body}");
            let t = ChatTemplate::new(Some(&source), "", "").expect("compiles");
            let err = t.render(&[Message::user("hi")], true).expect_err(body);
            assert!(
                err.to_string().contains("cannot be printed"),
                "{body}: {err}"
            );
        }
        let source =
            "{{ {'a': [1, {'b': 2}]} }}|{{ [1, 2]|tojson }}|{{ {'k': 'v'}|tojson(indent=2) }}";
        let t = ChatTemplate::new(Some(source), "", "").expect("compiles");
        assert_eq!(
            t.render(&[], false).expect("renders"),
            "{\"a\": [1, {\"b\": 2}]}|[1,2]|{\n  \"k\": \"v\"\n}"
        );
    }

    #[test]
    fn endless_loops_run_out_of_fuel() {
        let src = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(Some(src), "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("more than 5000000 instructions"), "{err}");
    }

    #[test]
    fn huge_prompts_are_refused() {
        let src = "{% for i in range(100) %}{{ 'x' * 100000000 }}{% endfor %}";
        let t = ChatTemplate::new(Some(src), "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("exceeds 67108864 bytes"), "{err}");
    }

    #[test]
    fn llama3_style_template() {
        // Llama 3's template shape: bos_token, `| trim`, python methods.
        let src = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}{{ '  x '.strip() + 'ab'.upper() + ('ab'.startswith('a') | string) + {'k': 1}.get('z', 'd') }}";
        let t = ChatTemplate::new(Some(src), "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&[Message::user("  hi  ")], true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nxABTrued"
        );
        assert!(strftime_now("%d %B %Y".into()).len() >= 10);
    }
}
