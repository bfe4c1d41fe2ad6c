//! Saved sessions with their keys and values: a context long enough to
//! offload is resumed in a fresh engine without a prefill, gives bit-identical
//! next-token logits and decodes the same tokens; damaged or foreign files
//! are refused.

use std::path::{Path, PathBuf};

use tandem_runtime::policy::{PolicyConfig, DEFAULT_POLICY};
use tandem_runtime::{Engine, EngineOptions, Error, SavedSession, Session};
use tandem_tests::model_path;

/// Tokens of the test context: past `dense_below`, so the sparse layers offload.
const CONTEXT: usize = 320;

fn engine_with(policy: &str) -> Engine {
    let options = EngineOptions {
        threads: 2,
        cpu_workers: 2,
        policy: PolicyConfig {
            policy: policy.into(),
            sinks: 4,
            window: 64,
            dense_below: 256,
            ..PolicyConfig::default()
        },
        ..EngineOptions::default()
    };
    Engine::load(&model_path(), &options).expect("load")
}

fn scratch(name: &str) -> PathBuf {
    tandem_tests::scratch("saved-state", name)
}

fn context() -> Vec<u32> {
    (0..CONTEXT as u32)
        .map(|i| 200 + (i * 7919) % 20000)
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Greedy decoding of `n` tokens after `logits`, each step's logits compared.
fn decode(session: &mut Session<'_>, mut logits: Vec<f32>, n: usize) -> Vec<Vec<f32>> {
    let mut all = Vec::new();
    for _ in 0..n {
        logits = session.step(argmax(&logits)).expect("step");
        all.push(logits.clone());
    }
    all
}

/// Prefills the context, saves it with its state, and returns the logits,
/// the file and the logits of 8 greedy steps after it.
fn saved_after_prefill(policy: &str, name: &str) -> (Vec<f32>, PathBuf, Vec<Vec<f32>>) {
    let engine = engine_with(policy);
    let mut original = engine.session().expect("session");
    let logits = original
        .prefill(&context(), &mut |_, _| {})
        .expect("prefill");
    assert_eq!(
        original.kv().is_offloaded(),
        policy != "dense",
        "the context offloads"
    );
    let path = scratch(name);
    let saved = SavedSession {
        tokens: original.tokens().to_vec(),
        ..SavedSession::default()
    };
    engine
        .save_session_state(&path, &saved, &original)
        .expect("save");
    let decoded = decode(&mut original, logits.clone(), 8);
    (logits, path, decoded)
}

fn check_resumes_exactly(policy: &str, name: &str) {
    let (logits, path, decoded) = saved_after_prefill(policy, name);

    let engine = engine_with(policy);
    let loaded = engine.load_session(&path).expect("load");
    assert_eq!(loaded.state.as_ref().map(|s| s.tokens()), Some(CONTEXT));
    let mut reports = Vec::new();
    let (mut restored, restored_logits) = engine
        .restore_session(&loaded, None, &mut |done, total| {
            reports.push((done, total))
        })
        .expect("restore");
    // One report of the whole context at once: no prefill chunk ran.
    assert_eq!(
        reports,
        [(CONTEXT, CONTEXT)],
        "{policy}: no prefill chunk ran"
    );
    assert_eq!(restored.tokens(), context().as_slice());
    let restored_logits = restored_logits.expect("logits");
    assert!(
        same_bits(&logits, &restored_logits),
        "{policy}: next-token logits"
    );
    let again = decode(&mut restored, restored_logits, 8);
    for (step, (a, b)) in decoded.iter().zip(&again).enumerate() {
        assert!(same_bits(a, b), "{policy}: decode step {step}");
    }
}

#[test]
fn an_offloaded_session_resumes_without_a_prefill() {
    check_resumes_exactly(DEFAULT_POLICY, "default.tandem");
}

#[test]
fn an_int8_store_resumes_without_a_prefill() {
    check_resumes_exactly(&format!("{DEFAULT_POLICY},kbits=8,vbits=8"), "int8.tandem");
}

#[test]
fn an_int4_and_int2_store_resumes_without_a_prefill() {
    check_resumes_exactly(&format!("{DEFAULT_POLICY},kbits=4,vbits=2"), "int4.tandem");
}

#[test]
fn a_dense_session_resumes_without_a_prefill() {
    check_resumes_exactly("dense", "dense.tandem");
}

fn refusal(engine: &Engine, path: &Path) -> String {
    match engine.load_session(path) {
        Err(e @ Error::SessionFile { .. }) => e.to_string(),
        other => panic!("expected a session-file error, got {other:?}"),
    }
}

#[test]
fn damaged_and_foreign_state_files_are_refused() {
    let (_, path, _) = saved_after_prefill(DEFAULT_POLICY, "damaged.tandem");
    let bytes = std::fs::read(&path).expect("read");
    let engine = engine_with(DEFAULT_POLICY);

    std::fs::write(&path, &bytes[..bytes.len() - 10]).expect("write");
    assert!(refusal(&engine, &path).contains("truncated"));
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert!(refusal(&engine, &path).contains("truncated"));

    for at in [bytes.len() / 3, bytes.len() - 3] {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x10;
        std::fs::write(&path, &flipped).expect("write");
        let err = refusal(&engine, &path);
        assert!(err.contains("checksum"), "{err}");
    }

    std::fs::write(&path, &bytes).expect("write");
    let err = refusal(&engine_with("exact"), &path);
    assert!(err.contains("another attention policy"), "{err}");
}

/// The file at `path` with its JSON body's `"packed_rows_rotated":true`
/// blanked out (as files written before int4 and int2 rows were rotated
/// read), its checksum made good.
fn as_written_before_rotation(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let json_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let field = b",\"packed_rows_rotated\":true";
    let json = &mut bytes[24..24 + json_len];
    let at = json
        .windows(field.len())
        .position(|w| w == field)
        .expect("the flag is written");
    json[at..at + field.len()].fill(b' ');
    let crc = crc32(json);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, &bytes).expect("write");
}

/// CRC-32 (IEEE), as session files check their parts.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[test]
fn int4_rows_saved_unrotated_are_prefilled_again() {
    let policy = format!("{DEFAULT_POLICY},kbits=4,vbits=2");
    let (logits, path, _) = saved_after_prefill(&policy, "unrotated.tandem");
    as_written_before_rotation(&path);
    let engine = engine_with(&policy);
    let loaded = engine.load_session(&path).expect("load");
    assert!(loaded.state.is_none(), "the unrotated rows are not loaded");
    let mut reports = Vec::new();
    let (restored, restored_logits) = engine
        .restore_session(&loaded, None, &mut |done, total| {
            reports.push((done, total))
        })
        .expect("restore");
    assert_eq!(reports.last(), Some(&(CONTEXT, CONTEXT)));
    assert!(reports.len() > 1, "a prefill ran: {reports:?}");
    assert_eq!(restored.tokens(), context().as_slice());
    let restored_logits = restored_logits.expect("logits");
    assert!(same_bits(&logits, &restored_logits), "next-token logits");

    // A bf16 store's state still loads from such a file.
    let (_, path, _) = saved_after_prefill(DEFAULT_POLICY, "unrotated-bf16.tandem");
    as_written_before_rotation(&path);
    let loaded = engine_with(DEFAULT_POLICY)
        .load_session(&path)
        .expect("load");
    assert_eq!(loaded.state.as_ref().map(|s| s.tokens()), Some(CONTEXT));
}
