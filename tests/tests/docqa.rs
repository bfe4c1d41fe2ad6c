//! The document questions (`tests/data/doc-qa.toml`) on the default model:
//! the default policy answers, wording by wording, what dense answers.

use tandem_bench::eval::docqa::{load_questions, Question};
use tandem_bench::eval::{report, run_doc_qa, EvalOptions};
use tandem_runtime::policy::PolicyConfig;
use tandem_tests::model_path;

/// The questions about the two shortest documents (about 4k tokens each),
/// every wording: `tandem eval --doc-qa` asks the whole set.
fn short_document_questions() -> Vec<Question> {
    load_questions()
        .expect("questions")
        .into_iter()
        .filter(|q| matches!(q.document.as_str(), "gpl-2.0.txt" | "mpl-2.0.txt"))
        .collect()
}

#[test]
fn the_default_policy_answers_the_document_questions_dense_answers() {
    let questions = short_document_questions();
    assert!(questions.len() >= 4 && questions.iter().all(|q| q.wordings.len() >= 3));
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
