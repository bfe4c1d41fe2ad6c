//! Questions over long real documents (`tests/data/doc-qa.toml`): each asks
//! for a fact its document states once, in several wordings, and is answered
//! greedily by dense and by every policy from the same prefill.

use std::path::Path;

use serde::{Deserialize, Serialize};

use tandem_runtime::chat::{ChatTemplate, Message};
use tandem_runtime::tokenizer::Tokenizer;
use tandem_runtime::{Error, Result};

use crate::eval::corpus;

/// The question set's file name in the data directory.
pub const QUESTIONS_FILE: &str = "doc-qa.toml";

/// Tokens each case leaves for the reply.
pub const REPLY_TOKENS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuestionFile {
    question: Vec<Question>,
}

/// One fact asked about one document, as the question file states it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// A file of the data directory.
    pub document: String,
    /// Only the document's first bytes (cut back to a line end), if given.
    pub bytes: Option<usize>,
    /// Replies holding any of these (case ignored; digits-only answers as
    /// whole numbers) are right.
    pub answers: Vec<String>,
    /// Ways of asking the question.
    pub wordings: Vec<String>,
}

/// One (question, wording): its prompt and how to check a reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocCase {
    /// The question's document.
    pub document: String,
    /// The wording asked.
    pub wording: String,
    /// Accepted answers.
    pub answers: Vec<String>,
    /// The rendered chat, ready to generate the reply from.
    #[serde(skip)]
    pub prompt: Vec<u32>,
}

impl DocCase {
    /// Whether `reply` holds an accepted answer.
    pub fn is_answered_by(&self, reply: &str) -> bool {
        let reply = reply.to_lowercase();
        self.answers
            .iter()
            .any(|a| contains_answer(&reply, &a.to_lowercase()))
    }
}

/// Whether `reply` holds `answer`; an answer of digits only must not be part
/// of a longer number.
fn contains_answer(reply: &str, answer: &str) -> bool {
    if !answer.bytes().all(|b| b.is_ascii_digit()) {
        return reply.contains(answer);
    }
    let bytes = reply.as_bytes();
    reply.match_indices(answer).any(|(at, m)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + m.len()).copied();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

/// One policy's replies to the document questions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocQaRow {
    /// The policy as given.
    pub policy: String,
    /// The cases asked.
    pub cases: Vec<DocCase>,
    /// Per case, whether the policy answered it.
    pub correct: Vec<bool>,
    /// Per case, whether dense answered it.
    pub dense_correct: Vec<bool>,
    /// Per case, the policy's reply.
    pub replies: Vec<String>,
}

impl DocQaRow {
    /// Fraction of cases the policy answered.
    pub fn accuracy(&self) -> f64 {
        fraction(&self.correct)
    }

    /// Fraction of cases dense answered.
    pub fn dense_accuracy(&self) -> f64 {
        fraction(&self.dense_correct)
    }
}

fn fraction(hits: &[bool]) -> f64 {
    hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64
}

/// Reads the question set from the data directory.
pub fn load_questions() -> Result<Vec<Question>> {
    load_questions_from(&corpus::data_dir().join(QUESTIONS_FILE))
}

/// Reads a question set.
pub fn load_questions_from(path: &Path) -> Result<Vec<Question>> {
    let text = corpus::read(path)?;
    let file: QuestionFile = toml::from_str(&text).map_err(|e| {
        Error::InvalidRequest(format!("question file {}: {}", path.display(), e.message()))
    })?;
    for q in &file.question {
        if q.answers.is_empty() || q.wordings.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "question file {}: a question about {} needs answers and wordings",
                path.display(),
                q.document
            )));
        }
    }
    Ok(file.question)
}

/// Every (question, wording) of `questions` as a case for a model whose
/// context holds `context` tokens; an error names a case that does not fit.
pub fn cases(
    questions: &[Question],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    context: usize,
) -> Result<Vec<DocCase>> {
    let dir = corpus::data_dir();
    let mut out = Vec::new();
    for q in questions {
        let text = corpus::read(&dir.join(&q.document))?;
        let document = match q.bytes {
            Some(b) if b < text.len() => {
                let cut = text[..text.floor_char_boundary_compat(b)]
                    .rfind('\n')
                    .unwrap_or(0);
                &text[..cut]
            }
            _ => &text[..],
        };
        for wording in &q.wordings {
            let content = format!(
                "Read the following document, then answer the question after it.\n\n{}\n\nQuestion: {wording}",
                document.trim()
            );
            let text = template.render(&[Message::user(content)], true)?;
            let prompt = tokenizer.encode(&text, false)?;
            if prompt.len() + REPLY_TOKENS > context {
                return Err(Error::InvalidRequest(format!(
                    "the question \"{wording}\" about {} takes {} tokens, more than the context of {context} less {REPLY_TOKENS} for the reply",
                    q.document,
                    prompt.len()
                )));
            }
            out.push(DocCase {
                document: q.document.clone(),
                wording: wording.clone(),
                answers: q.answers.clone(),
                prompt,
            });
        }
    }
    Ok(out)
}

/// `str::floor_char_boundary`, which is not stable yet.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, at: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, at: usize) -> usize {
        (0..=at.min(self.len()))
            .rev()
            .find(|&i| self.is_char_boundary(i))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_case_blind_and_numbers_whole() {
        let case = DocCase {
            document: "d".into(),
            wording: "w".into(),
            answers: vec!["30".into(), "Thirty days".into()],
            prompt: vec![],
        };
        assert!(case.is_answered_by("Within 30 days."));
        assert!(case.is_answered_by("thirty DAYS"));
        assert!(!case.is_answered_by("300 days"));
        assert!(!case.is_answered_by("1930"));
        assert!(!case.is_answered_by("60 days"));
    }

    #[test]
    fn the_shipped_question_set_reads_and_names_real_documents() {
        let questions = load_questions().expect("questions");
        assert!(questions.len() >= 10);
        for q in &questions {
            assert!(q.wordings.len() >= 2, "{}", q.document);
            let text = corpus::read(&corpus::data_dir().join(&q.document)).expect("document");
            let kept = &text[..q.bytes.unwrap_or(text.len()).min(text.len())];
            // The fact is stated in the part of the document kept.
            assert!(
                q.answers
                    .iter()
                    .any(|a| kept.to_lowercase().contains(&a.to_lowercase())),
                "{}: none of {:?}",
                q.document,
                q.answers
            );
        }
    }
}
