//! Needle in a haystack, RULER's tasks: key-value facts hidden in real filler
//! text, then a question asking for a value. [`NeedleTask::Single`] hides one
//! fact; [`NeedleTask::MultiKey`] hides others about other keys besides (the
//! distractors); [`NeedleTask::MultiValue`] hides several values of the same
//! key and asks for all of them.
//!
//! Cases are deterministic given the seed, the task, the context length and
//! the case count. The depths of one context's cases are spread evenly over
//! 0-100% (the asked fact's; the others spread evenly from it); each case
//! draws its own keys (common words), values (5-7 digit numbers) and the place
//! in the corpus its filler is taken from. The filler is whole sentences,
//! preceded by the end of one more sentence so that each prompt fills its
//! context to within a few tokens; needles go between two sentences.

use tandem_kernels::rng::SplitMix64;

use tandem_runtime::chat::{ChatTemplate, Message};
use tandem_runtime::tokenizer::Tokenizer;
use tandem_runtime::{Error, Result};

/// Tokens each case leaves free for the reply: a prompt for context `n` holds at
/// most `n - ANSWER_TOKENS` tokens, so `n` may be the model's whole context.
/// SmolLM2 spends a token per digit and sometimes restates the question first,
/// so 16 would cut correct answers short.
pub const ANSWER_TOKENS: usize = 32;

/// Which RULER needle task a case poses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedleTask {
    /// One fact; its value is asked.
    Single,
    /// The asked fact and `distractors` facts about other keys.
    MultiKey {
        /// Facts about other keys.
        distractors: usize,
    },
    /// `values` facts about one key; all values are asked.
    MultiValue {
        /// Values of the key.
        values: usize,
    },
}

impl NeedleTask {
    /// RULER's multi-key task with three distractors.
    pub const MULTI_KEY: NeedleTask = NeedleTask::MultiKey { distractors: 3 };
    /// RULER's multi-value task with four values.
    pub const MULTI_VALUE: NeedleTask = NeedleTask::MultiValue { values: 4 };

    /// The task's name in tables: `single`, `multikey` or `multivalue`.
    pub fn name(self) -> &'static str {
        match self {
            NeedleTask::Single => "single",
            NeedleTask::MultiKey { .. } => "multikey",
            NeedleTask::MultiValue { .. } => "multivalue",
        }
    }

    /// Parses [`NeedleTask::name`] (with the default counts).
    pub fn parse(name: &str) -> Option<NeedleTask> {
        match name.trim() {
            "single" => Some(NeedleTask::Single),
            "multikey" => Some(NeedleTask::MULTI_KEY),
            "multivalue" => Some(NeedleTask::MULTI_VALUE),
            _ => None,
        }
    }

    /// Facts hidden per case.
    fn needles(self) -> usize {
        match self {
            NeedleTask::Single => 1,
            NeedleTask::MultiKey { distractors } => 1 + distractors,
            NeedleTask::MultiValue { values } => values.max(1),
        }
    }
}

/// How a case is worded. In every field `{key}` and `{value}` are replaced by the
/// case's key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wording {
    /// The fact inserted into the filler.
    pub needle: String,
    /// The user's message before the filler.
    pub before: String,
    /// The user's message after the filler.
    pub after: String,
    /// The start of the assistant's reply, appended to the rendered chat.
    pub answer_prefix: String,
}

impl Wording {
    /// RULER's multi-value wording: the question asks for every number.
    pub fn multi_value() -> Self {
        Wording {
            after:
                "What are all the special magic numbers for {key} mentioned in the provided text?"
                    .into(),
            answer_prefix: "The special magic numbers for {key} mentioned in the provided text are"
                .into(),
            ..Wording::default()
        }
    }
}

impl Default for Wording {
    /// RULER's niah wording (with its answer prefix). SmolLM2-135M-Instruct with
    /// dense attention answers 20/20 cases at 1k and 2k tokens and 18/20 at 4k
    /// (seed 6); at 8k only about half (it misses most needles in the first 40%).
    fn default() -> Self {
        Wording {
            needle: "One of the special magic numbers for {key} is: {value}.".into(),
            before: "Some special magic numbers are hidden within the following text. \
                     Make sure to memorize it. I will quiz you about the numbers afterwards."
                .into(),
            after: "What is the special magic number for {key} mentioned in the provided text?"
                .into(),
            answer_prefix: "The special magic number for {key} mentioned in the provided text is"
                .into(),
        }
    }
}

/// One question: the prompt tokens and the expected answer.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedleCase {
    /// The word the asked facts are about.
    pub key: String,
    /// The numbers to retrieve (one but for the multi-value task).
    pub values: Vec<String>,
    /// Where the asked fact sits in the filler: 0 at its start, 1 at its end.
    pub depth: f64,
    /// The rendered chat, ready to generate the answer from.
    pub prompt: Vec<u32>,
}

impl NeedleCase {
    /// Whether a reply gives every value: each one's digits appear as a whole
    /// number (not inside a longer one); thousands separators are ignored.
    pub fn is_answered_by(&self, reply: &str) -> bool {
        let reply: String = reply.chars().filter(|&c| c != ',').collect();
        let bytes = reply.as_bytes();
        let gives = |value: &str| {
            reply.match_indices(value).any(|(at, m)| {
                let before = at.checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(at + m.len()).copied();
                !before.is_some_and(|b| b.is_ascii_digit())
                    && !after.is_some_and(|b| b.is_ascii_digit())
            })
        };
        !self.values.is_empty() && self.values.iter().all(|v| gives(v))
    }
}

/// Builds needle cases from a corpus for one model's tokenizer and chat template.
#[derive(Debug, Clone)]
pub struct NeedleBuilder<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    wording: Wording,
    task: NeedleTask,
    seed: u64,
    /// The corpus cut into sentences, each with its leading whitespace, and the
    /// token count of each on its own.
    sentences: Vec<(&'a str, usize)>,
}

/// Common words used as keys.
const KEYS: &[&str] = &[
    "apple", "river", "garden", "lantern", "mountain", "pencil", "violin", "castle", "harbor",
    "meadow", "rocket", "candle", "falcon", "island", "forest", "teacup", "compass", "dragon",
    "ladder", "mirror", "orchard", "pepper", "planet", "saddle", "tiger", "wagon", "anchor",
    "basket", "blanket", "bridge", "button", "carpet", "cherry", "cloud", "coffee", "desert",
    "dolphin", "feather", "flower", "glacier", "hammer", "helmet", "jacket", "kettle", "kitchen",
    "lemon", "magnet", "marble", "monkey", "ocean", "onion", "parrot", "piano", "pillow",
    "pumpkin", "rabbit", "ribbon", "shadow", "spoon", "squirrel", "sunset", "tomato", "tunnel",
    "turtle", "umbrella", "valley", "village", "whistle", "zebra",
];

impl<'a> NeedleBuilder<'a> {
    /// A builder over `corpus` (see [`crate::eval::corpus`]) with the default wording.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: &'a ChatTemplate,
        corpus: &'a str,
        seed: u64,
    ) -> Result<Self> {
        let sentences = split_sentences(corpus)
            .into_iter()
            .map(|s| Ok((s, tokenizer.encode(s, false)?.len())))
            .collect::<Result<Vec<_>>>()?;
        if sentences.is_empty() {
            return Err(Error::InvalidRequest(
                "the needle corpus has no text".into(),
            ));
        }
        Ok(NeedleBuilder {
            tokenizer,
            template,
            wording: Wording::default(),
            task: NeedleTask::Single,
            seed,
            sentences,
        })
    }

    /// The same builder with another wording.
    pub fn with_wording(mut self, wording: Wording) -> Self {
        self.wording = wording;
        self
    }

    /// The same builder for another task, with the task's default wording.
    pub fn with_task(mut self, task: NeedleTask) -> Self {
        self.task = task;
        self.wording = match task {
            NeedleTask::MultiValue { .. } => Wording::multi_value(),
            _ => Wording::default(),
        };
        self
    }

    /// `count` cases whose prompts fill `context` tokens less [`ANSWER_TOKENS`]
    /// (as nearly as whole sentences allow), at depths `i / (count - 1)`.
    pub fn cases(&self, context: usize, count: usize) -> Result<Vec<NeedleCase>> {
        let task_seed = match self.task {
            NeedleTask::Single => 0,
            NeedleTask::MultiKey { distractors } => 0x6b00 + distractors as u64,
            NeedleTask::MultiValue { values } => 0x7600 + values as u64,
        };
        let mut rng = SplitMix64(
            self.seed ^ task_seed ^ (context as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        (0..count)
            .map(|i| {
                let depth = if count > 1 {
                    i as f64 / (count - 1) as f64
                } else {
                    0.5
                };
                self.case(context, depth, &mut rng)
            })
            .collect()
    }

    fn case(&self, context: usize, depth: f64, rng: &mut SplitMix64) -> Result<NeedleCase> {
        let budget = context.saturating_sub(ANSWER_TOKENS);
        let key = KEYS[(rng.next_u64() % KEYS.len() as u64) as usize];
        let count = self.sentences.len();
        let last = (rng.next_u64() % count as u64) as usize;
        // The facts: (key, value, depth), the asked one first.
        let n = self.task.needles();
        let mut facts: Vec<(&str, String, f64)> = Vec::with_capacity(n);
        for j in 0..n {
            let fact_key = match self.task {
                NeedleTask::MultiKey { .. } if j > 0 => loop {
                    let other = KEYS[(rng.next_u64() % KEYS.len() as u64) as usize];
                    if facts.iter().all(|f| f.0 != other) {
                        break other;
                    }
                },
                _ => key,
            };
            // The others spread evenly from the asked one, wrapping round.
            let at = match j {
                0 => depth,
                _ => (depth + j as f64 / n as f64).fract(),
            };
            facts.push((fact_key, new_value(rng), at));
        }
        let fill =
            |s: &str, key: &str, value: &str| s.replace("{key}", key).replace("{value}", value);
        let w = &self.wording;
        // Each needle goes at the boundary between pieces nearest to its depth
        // of the haystack's tokens.
        let render =
            |pieces: &[(&str, usize)], facts: &[(&str, String, f64)]| -> Result<Vec<u32>> {
                let total = pieces.iter().map(|p| p.1).sum::<usize>() as f64;
                let mut slots: Vec<(usize, String)> = facts
                    .iter()
                    .map(|(k, v, d)| (nearest_boundary(pieces, d * total), fill(&w.needle, k, v)))
                    .collect();
                slots.sort_by_key(|s| s.0);
                let mut haystack = String::new();
                let mut next = slots.iter().peekable();
                for k in 0..=pieces.len() {
                    while let Some((_, needle)) = next.next_if(|s| s.0 == k) {
                        haystack.push(' ');
                        haystack.push_str(needle);
                    }
                    if let Some((piece, _)) = pieces.get(k) {
                        haystack.push_str(piece);
                    }
                }
                let content = format!(
                    "{}\n\n{}\n\n{}",
                    fill(&w.before, key, ""),
                    haystack.trim(),
                    fill(&w.after, key, "")
                );
                let mut text = self.template.render(&[Message::user(content)], true)?;
                text.push_str(&fill(&w.answer_prefix, key, ""));
                self.tokenizer.encode(&text, false)
            };

        let overhead = render(&[], &facts)?.len();
        if overhead >= budget {
            return Err(Error::InvalidRequest(format!(
                "a needle case needs more than {overhead} + {ANSWER_TOKENS} tokens; context {context} is too small"
            )));
        }
        // Whole sentences backwards from `last` (wrapping round the corpus) while
        // their own token counts, which add up to about the count of their
        // concatenation, fit; then the end of the sentence before, as many words
        // as fit.
        let mut pieces = Vec::new();
        let mut used = overhead;
        for k in 0..count {
            let (s, n) = self.sentences[(last + count - k) % count];
            if used + n > budget {
                let head = self.word_suffix(s, budget - used);
                if !head.is_empty() {
                    pieces.push((head, self.tokenizer.encode(head, false)?.len()));
                }
                break;
            }
            used += n;
            pieces.push((s, n));
        }
        pieces.reverse();
        // A value that already occurs in the filler, or twice among the facts,
        // would make the answer ambiguous.
        for j in 0..facts.len() {
            while pieces.iter().any(|(s, _)| s.contains(facts[j].1.as_str()))
                || facts[..j].iter().any(|f| f.1 == facts[j].1)
            {
                facts[j].1 = new_value(rng);
            }
        }
        // Cut words off the front until the rendered prompt fits.
        loop {
            let prompt = render(&pieces, &facts)?;
            let over = prompt.len().saturating_sub(budget);
            if over == 0 {
                let values = match self.task {
                    NeedleTask::MultiValue { .. } => facts.iter().map(|f| f.1.clone()).collect(),
                    _ => vec![facts[0].1.clone()],
                };
                return Ok(NeedleCase {
                    key: key.to_string(),
                    values,
                    depth,
                    prompt,
                });
            }
            let Some(&(first, n)) = pieces.first() else {
                return Err(Error::InvalidRequest(format!(
                    "an empty needle case is {over} tokens over its budget"
                )));
            };
            // Strictly shorter: `n` is the count of `first` itself.
            let shorter = self.word_suffix(first, n.saturating_sub(over));
            if shorter.is_empty() {
                pieces.remove(0);
            } else {
                pieces[0] = (shorter, self.tokenizer.encode(shorter, false)?.len());
            }
        }
    }

    /// The longest suffix of `s` starting at a whitespace (or `s` itself) that
    /// encodes to at most `max_tokens` tokens.
    fn word_suffix<'s>(&self, s: &'s str, max_tokens: usize) -> &'s str {
        let cuts: Vec<usize> = [0]
            .into_iter()
            .chain(
                s.char_indices()
                    .filter(|&(i, c)| i > 0 && c.is_whitespace())
                    .map(|(i, _)| i),
            )
            .collect();
        let too_long = |&cut: &usize| {
            self.tokenizer
                .encode(&s[cut..], false)
                .map_or(true, |t| t.len() > max_tokens)
        };
        cuts.get(cuts.partition_point(too_long))
            .map_or("", |&cut| &s[cut..])
    }
}

/// A 5-7 digit number.
fn new_value(rng: &mut SplitMix64) -> String {
    let digits = 5 + (rng.next_u64() % 3) as u32;
    let low = 10u64.pow(digits - 1);
    (low + rng.next_u64() % (9 * low)).to_string()
}

/// The boundary between `pieces` (0 before the first, `pieces.len()` after
/// the last) nearest to `target` tokens into them.
fn nearest_boundary(pieces: &[(&str, usize)], target: f64) -> usize {
    let mut best = (0, target);
    let mut tokens = 0;
    for (k, &(_, n)) in pieces.iter().enumerate() {
        tokens += n;
        let miss = (tokens as f64 - target).abs();
        if miss < best.1 {
            best = (k + 1, miss);
        }
    }
    best.0
}

/// Cuts text after `.`, `?` or `!` followed by whitespace, and before blank
/// lines. Whitespace starts the following piece (where a byte-level BPE puts it),
/// so a piece's token count on its own is close to its count within the text.
/// The pieces concatenate to the text without its trailing whitespace.
fn split_sentences(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let cuts = (1..b.len()).filter(|&i| {
        let after_mark = matches!(b[i - 1], b'.' | b'?' | b'!') && b[i].is_ascii_whitespace();
        let blank_line = b[i] == b'\n' && b.get(i + 1) == Some(&b'\n');
        after_mark || blank_line
    });
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.chain([b.len()]) {
        // A piece of whitespace only joins the next one.
        if !text[start..cut].trim().is_empty() {
            out.push(&text[start..cut]);
            start = cut;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_runtime::model::gguf::GgufFile;

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    fn smollm() -> Tokenizer {
        assert!(
            std::path::Path::new(MODEL).exists(),
            "model file {MODEL} is missing: run scripts/setup.sh first"
        );
        let file = GgufFile::open(MODEL).expect("open model");
        Tokenizer::from_gguf(&file).expect("build tokenizer")
    }

    #[test]
    fn sentences_concatenate_back() {
        let text = "One. Two?  Three!\nFour\n\n\nFive 1.5 six. ";
        let s = split_sentences(text);
        assert_eq!(
            s,
            ["One.", " Two?", "  Three!", "\nFour", "\n\n\nFive 1.5 six."]
        );
        assert_eq!(s.concat(), text.trim_end());
        assert!(split_sentences("  \n\n ").is_empty());
    }

    #[test]
    fn answers_need_the_whole_number() {
        let case = NeedleCase {
            key: "apple".into(),
            values: vec!["123456".into()],
            depth: 0.0,
            prompt: vec![],
        };
        assert!(case.is_answered_by(" 123456."));
        assert!(case.is_answered_by("The code is 123,456"));
        assert!(case.is_answered_by("123456"));
        assert!(!case.is_answered_by(" 1234567"));
        assert!(!case.is_answered_by(" 0123456"));
        assert!(!case.is_answered_by(" 12345"));
        assert!(!case.is_answered_by(""));
        let both = NeedleCase {
            values: vec!["123456".into(), "98765".into()],
            ..case
        };
        assert!(both.is_answered_by("98765 and 123456"));
        assert!(!both.is_answered_by("123456 only"));
    }

    #[test]
    fn cases_fit_the_context_and_hold_the_needle_at_their_depth() {
        let tok = smollm();
        let template = ChatTemplate::new(None, "", "").unwrap();
        let corpus = crate::eval::corpus::load().unwrap();
        let builder = NeedleBuilder::new(&tok, &template, &corpus, 1).unwrap();
        for context in [1024, 4096] {
            let cases = builder.cases(context, 5).unwrap();
            assert_eq!(cases, builder.cases(context, 5).unwrap(), "deterministic");
            let depths: Vec<f64> = cases.iter().map(|c| c.depth).collect();
            assert_eq!(depths, [0.0, 0.25, 0.5, 0.75, 1.0]);
            for case in &cases {
                let n = case.prompt.len();
                assert!(n <= context - ANSWER_TOKENS, "{n} tokens for {context}");
                assert!(
                    n + ANSWER_TOKENS + 16 > context,
                    "only {n} tokens for {context}"
                );
                assert_eq!(case.values.len(), 1);
                let value = &case.values[0];
                assert!((5..=7).contains(&value.len()));
                let text = tok.decode(&case.prompt).unwrap();
                let needle = format!(
                    "One of the special magic numbers for {} is: {}.",
                    case.key, value
                );
                assert_eq!(text.matches(&needle).count(), 1, "{text}");
                assert_eq!(text.matches(value.as_str()).count(), 1);
                assert!(text.starts_with("<|im_start|>user\nSome special magic numbers"));
                assert!(text.ends_with(&format!(
                    "provided text?<|im_end|>\n<|im_start|>assistant\n\
                     The special magic number for {} mentioned in the provided text is",
                    case.key
                )));
                // The needle's place in the filler follows the depth.
                let body = &text[text.find("\n\n").unwrap()..text.rfind("\n\nWhat is").unwrap()];
                let at = body.find(&needle).unwrap() as f64 / body.len() as f64;
                assert!(
                    (at - case.depth).abs() < 0.1,
                    "depth {} at {at}",
                    case.depth
                );
            }
        }
        let other = NeedleBuilder::new(&tok, &template, &corpus, 2).unwrap();
        assert_ne!(
            builder.cases(1024, 3).unwrap(),
            other.cases(1024, 3).unwrap()
        );
        assert!(builder.cases(40, 1).is_err());
    }

    #[test]
    fn multi_key_and_multi_value_cases_hide_every_fact_once() {
        let tok = smollm();
        let template = ChatTemplate::new(None, "", "").unwrap();
        let corpus = crate::eval::corpus::load().unwrap();
        let builder = NeedleBuilder::new(&tok, &template, &corpus, 1).unwrap();
        let facts = |text: &str| {
            text.matches("One of the special magic numbers for ")
                .count()
        };
        let keys = builder.clone().with_task(NeedleTask::MULTI_KEY);
        for case in keys.cases(2048, 3).unwrap() {
            let text = tok.decode(&case.prompt).unwrap();
            assert_eq!(facts(&text), 4, "{text}");
            assert_eq!(case.values.len(), 1);
            let asked = format!("for {} is: {}.", case.key, case.values[0]);
            assert_eq!(text.matches(&asked).count(), 1);
            assert_eq!(text.matches(&format!("for {} is:", case.key)).count(), 1);
            assert!(case.prompt.len() <= 2048 - ANSWER_TOKENS);
        }
        let values = builder.clone().with_task(NeedleTask::MULTI_VALUE);
        for case in values.cases(2048, 3).unwrap() {
            let text = tok.decode(&case.prompt).unwrap();
            assert_eq!(case.values.len(), 4);
            for v in &case.values {
                let fact = format!("for {} is: {v}.", case.key);
                assert_eq!(text.matches(&fact).count(), 1, "{text}");
            }
            assert_eq!(facts(&text), 4);
            assert!(text.contains("What are all the special magic numbers for"));
        }
        assert_ne!(
            keys.cases(1024, 2).unwrap(),
            builder.cases(1024, 2).unwrap()
        );
        assert_eq!(NeedleTask::parse("multikey"), Some(NeedleTask::MULTI_KEY));
        assert_eq!(NeedleTask::parse("nope"), None);
    }
}
