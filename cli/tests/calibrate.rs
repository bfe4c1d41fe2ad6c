//! `tandem calibrate` end to end on the default model with a short context,
//! the file it writes loaded by `--policy-file`, and its refusals of bad
//! input, none of which leaves a file behind.

mod common;

use std::time::Duration;

use common::{run, scratch_file, stderr};

const LIMIT: Duration = Duration::from_secs(120);

fn calibrate(out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "calibrate",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--queries",
        "2",
        "--window",
        "16",
        "--out",
        out,
    ];
    if !extra.contains(&"--context") {
        args.extend_from_slice(&["--context", "300"]);
    }
    args.extend_from_slice(extra);
    run(&args, "", LIMIT)
}

#[test]
fn calibrate_writes_a_policy_file_that_generate_loads() {
    let out = scratch_file("calibrated.toml", b"");
    std::fs::remove_file(&out).expect("no file yet");
    let path = out.to_str().expect("utf-8 path");
    let run_out = calibrate(
        path,
        &[
            "--budget-bits",
            "10",
            "--pairs",
            "8/8,4/4,16/16",
            "--policy",
            "topk:k=32",
        ],
    );
    let err = stderr(&run_out);
    assert!(run_out.status.success(), "{err}");
    let table = String::from_utf8_lossy(&run_out.stdout);
    assert!(table.contains("K4V4 "), "int4 is measured: {table}\n{err}");
    assert!(table.contains("| 1 | "), "{table}");
    assert!(
        table.contains("dense layers 0,15: on the device in bf16"),
        "{table}"
    );
    assert!(table.contains("predicted error"), "{table}");
    let written = std::fs::read_to_string(&out).expect("written");
    assert!(written.contains("[layers]"), "{written}");
    assert!(written.contains("topk:k=32,kbits="), "{written}");
    let generated = run(
        &[
            "generate",
            "--threads",
            "2",
            "-n",
            "1",
            "-p",
            "Hi",
            "--policy-file",
            path,
        ],
        "",
        LIMIT,
    );
    let err = stderr(&generated);
    assert!(generated.status.success(), "{err}");
    assert!(
        err.contains("kbits="),
        "the table is printed at start: {err}"
    );
    // `tandem eval` compares the file's whole table with dense.
    let evaluated = run(
        &[
            "eval",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--context",
            "300",
            "--scored",
            "4",
            "--needle-cases",
            "0",
            "--policy",
            path,
        ],
        "",
        LIMIT,
    );
    let err = stderr(&evaluated);
    assert!(evaluated.status.success(), "{err}");
    let report = String::from_utf8_lossy(&evaluated.stdout);
    assert!(report.contains(&format!("| {path} | 300 |")), "{report}");
}

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let out = scratch_file("refused.toml", b"");
    std::fs::remove_file(&out).expect("no file yet");
    let path = out.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 9] = [
        (
            &["--budget-bits", "8", "--memory-limit", "1M"],
            "a calibration at 300 tokens",
        ),
        (&["--budget-bits", "1.5"], "outside [2, 16]"),
        (&["--budget-bits", "17"], "outside [2, 16]"),
        (
            &["--budget-bits", "8", "--pairs", "8/3"],
            "unknown pair \"8/3\"",
        ),
        (
            &["--budget-bits", "8", "--context", "100000"],
            "above the model's",
        ),
        (&["--budget-bits", "4", "--pairs", "8/8"], "no assignment"),
        (
            &["--budget-bits", "8", "--recall", "3"],
            "3 recalled tokens are more than the 2 decoded",
        ),
        (
            &["--budget-bits", "8", "--int2-heads", "1,0"],
            "int2 heads \"1,0\"",
        ),
        (
            &["--budget-bits", "8", "--policy", "lsh:k=10,l=75,kbits=8"],
            "leave out kbits",
        ),
    ];
    for (extra, expected) in cases {
        let result = calibrate(path, extra);
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left a file");
    }
    let missing = out.with_file_name("no-such-dir").join("p.toml");
    let result = calibrate(missing.to_str().expect("utf-8"), &["--budget-bits", "8"]);
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{err}");
    assert!(err.contains("no-such-dir"), "{err}");
}
