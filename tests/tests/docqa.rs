//! The document questions (`tests/data/doc-qa.toml`) on the default model:
//! the default policy answers, wording by wording, what dense answers.

use tandem_bench::eval::corpus;
use tandem_bench::eval::docqa::{load_questions, Question};
use tandem_bench::eval::{report, run_doc_qa, EvalOptions};
use tandem_runtime::policy::PolicyConfig;
use tandem_tests::model_path;

/// Bytes of each document kept: about 1,500 tokens, so that the suite stays
/// short (`tandem eval --doc-qa` asks the whole set over whole documents).
const KEPT_BYTES: usize = 6000;

/// The shipped questions, every wording, whose answer the first
/// [`KEPT_BYTES`] of their document state.
fn questions_on_document_heads() -> Vec<Question> {
    load_questions()
        .expect("questions")
        .into_iter()
        .filter(|q| {
            let text = corpus::read(&corpus::data_dir().join(&q.document)).expect("document");
            let kept = text[..KEPT_BYTES.min(text.len())].to_lowercase();
            q.answers.iter().any(|a| kept.contains(&a.to_lowercase()))
        })
        .map(|q| Question {
            bytes: Some(KEPT_BYTES),
            ..q
        })
        .collect()
}

#[test]
fn the_default_policy_answers_the_document_questions_dense_answers() {
    let questions = questions_on_document_heads();
    assert!(questions.len() >= 3 && questions.iter().all(|q| q.wordings.len() >= 3));
    let default = PolicyConfig::default().policy;
    let opts = EvalOptions {
        model: model_path(),
        policies: vec![default.clone()],
        contexts: vec![],
        scored: 1,
        needle_cases: 0,
        needle_tasks: vec![],
        base: PolicyConfig::default(),
        threads: 2,
        cpu_workers: 2,
        diagnose: None,
    };
    let rows = run_doc_qa(&opts, &questions, &mut |_| {}).expect("document questions");
    let row = &rows[0];
    eprint!("{}", report::doc_qa_table(&rows));
    for ((case, reply), (&ok, &dense_ok)) in row
        .cases
        .iter()
        .zip(&row.replies)
        .zip(row.correct.iter().zip(&row.dense_correct))
    {
        if ok != dense_ok {
            eprintln!(
                "{}: {:?}: {default} {} ({reply:?}), dense {}",
                case.document,
                case.wording,
                if ok { "right" } else { "wrong" },
                if dense_ok { "right" } else { "wrong" }
            );
        }
    }
    assert!(
        row.dense_accuracy() > 0.0,
        "dense answers none: the set is too hard"
    );
    assert!(
        row.accuracy() >= row.dense_accuracy(),
        "{default} answers {:.0}% where dense answers {:.0}%",
        100.0 * row.accuracy(),
        100.0 * row.dense_accuracy()
    );
}
