//! The C entry points called from Rust: status codes and messages for bad
//! arguments, cancellation before and during work, and damaged session files.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use tandem::*;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn c(text: &str) -> CString {
    CString::new(text).expect("no NUL")
}

fn last_error() -> String {
    // SAFETY: this thread's message, alive until its next tandem call.
    unsafe { CStr::from_ptr(tandem_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Loads and frees an engine; the status of the load, its message kept as
/// the thread's last error.
fn load(path: *const c_char, device: *const c_char, policy: *const c_char) -> TandemStatus {
    let mut engine = null_mut();
    // SAFETY: valid strings or NULL, and a writable out-pointer.
    let status = unsafe { tandem_engine_load(path, device, policy, &mut engine) };
    if !engine.is_null() {
        // SAFETY: the engine just loaded.
        assert_eq!(
            unsafe { tandem_engine_free(engine) },
            TandemStatus::TandemOk
        );
    }
    status
}

#[test]
fn bad_arguments_give_their_status_and_message() {
    let missing = c("/no/such/model.gguf");
    assert_eq!(
        load(missing.as_ptr(), null(), null()),
        TandemStatus::TandemErrIo
    );
    assert!(
        last_error().contains("/no/such/model.gguf"),
        "{}",
        last_error()
    );

    assert_eq!(
        load(null(), null(), null()),
        TandemStatus::TandemErrNullArgument
    );
    assert_eq!(last_error(), "model_path is NULL");

    let not_utf8 = CString::new(vec![0xff, 0xfe]).expect("no NUL");
    assert_eq!(
        load(not_utf8.as_ptr(), null(), null()),
        TandemStatus::TandemErrInvalidUtf8
    );

    let model = c(MODEL);
    let gpu = c("tpu");
    assert_eq!(
        load(model.as_ptr(), gpu.as_ptr(), null()),
        TandemStatus::TandemErrInvalidArgument
    );
    assert!(last_error().contains("tpu"), "{}", last_error());

    let policy = c("lsh:k=nonsense");
    assert_eq!(
        load(model.as_ptr(), null(), policy.as_ptr()),
        TandemStatus::TandemErrInvalidArgument
    );
    assert!(last_error().contains("nonsense"), "{}", last_error());

    // SAFETY: NULL handles and out-pointers are what is being tested.
    unsafe {
        assert_eq!(load(model.as_ptr(), null(), null()), TandemStatus::TandemOk);
        assert_eq!(
            tandem_engine_load(model.as_ptr(), null(), null(), null_mut()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(
            tandem_session_new(null(), &mut null_mut()),
            TandemStatus::TandemErrNullArgument
        );
        let text = c("hi");
        assert_eq!(
            tandem_session_prefill(null(), text.as_ptr(), None, null_mut()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(
            tandem_session_generate(null(), 1, 0.0, 0, None, null_mut()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(
            tandem_session_cancel(null()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(
            tandem_session_save(null(), text.as_ptr()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(tandem_session_free(null_mut()), TandemStatus::TandemOk);
        assert_eq!(tandem_engine_free(null_mut()), TandemStatus::TandemOk);
    }
}

/// A progress callback that cancels its session (passed as `user_data`) once
/// the first chunk is done.
unsafe extern "C" fn cancel_after_first_chunk(done: usize, total: usize, user_data: *mut c_void) {
    if done < total {
        // SAFETY: `user_data` is the live session being prefilled.
        unsafe { tandem_session_cancel(user_data as *const TandemSession) };
    }
}

#[test]
fn sessions_cancel_refuse_and_restore() {
    let model = c(MODEL);
    let mut engine = null_mut();
    let mut session = null_mut();
    // SAFETY: valid strings, handles and out-pointers throughout.
    unsafe {
        assert_eq!(
            tandem_engine_load(model.as_ptr(), null(), null(), &mut engine),
            TandemStatus::TandemOk
        );
        assert_eq!(
            tandem_session_new(engine, &mut session),
            TandemStatus::TandemOk
        );
        assert_eq!(
            tandem_session_prefill(session, null(), None, null_mut()),
            TandemStatus::TandemErrNullArgument
        );
        assert_eq!(
            tandem_session_token_count(session, null_mut()),
            TandemStatus::TandemErrNullArgument
        );

        assert_eq!(
            tandem_session_generate(session, 4, 0.0, 0, None, null_mut()),
            TandemStatus::TandemErrInvalidArgument
        );
        assert!(
            last_error().contains("prefill a prompt first"),
            "{}",
            last_error()
        );

        let prompt = c("<|im_start|>user\nHello there, how are you today?<|im_end|>\n");
        assert_eq!(tandem_session_cancel(session), TandemStatus::TandemOk);
        assert_eq!(
            tandem_session_prefill(session, prompt.as_ptr(), None, null_mut()),
            TandemStatus::TandemErrCancelled
        );
        let mut count = usize::MAX;
        assert_eq!(
            tandem_session_token_count(session, &mut count),
            TandemStatus::TandemOk
        );
        assert_eq!(count, 0, "a cancelled prefill leaves nothing behind");
        let long = c(&"one two three four five six seven eight ".repeat(80));
        assert_eq!(
            tandem_session_prefill(
                session,
                long.as_ptr(),
                Some(cancel_after_first_chunk),
                session.cast()
            ),
            TandemStatus::TandemErrCancelled,
            "a cancel during the prefill stops it between chunks"
        );
        assert_eq!(
            tandem_session_token_count(session, &mut count),
            TandemStatus::TandemOk
        );
        assert_eq!(count, 0, "and drops the chunks already run");
        assert_eq!(
            tandem_session_prefill(session, prompt.as_ptr(), None, null_mut()),
            TandemStatus::TandemOk
        );
        assert_eq!(
            tandem_session_token_count(session, &mut count),
            TandemStatus::TandemOk
        );
        assert!(count > 5, "{count}");

        let dir = std::env::temp_dir().join(format!("tandem-capi-ffi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let file = dir.join("s.tandem");
        let path = c(file.to_str().expect("UTF-8 path"));
        assert_eq!(
            tandem_session_save(session, path.as_ptr()),
            TandemStatus::TandemOk
        );
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&file, &bytes).expect("write");
        assert_eq!(
            tandem_session_restore(session, path.as_ptr(), None, null_mut()),
            TandemStatus::TandemErrSessionFile
        );
        assert!(last_error().contains("truncated"), "{}", last_error());
        let mut after = 0;
        assert_eq!(
            tandem_session_token_count(session, &mut after),
            TandemStatus::TandemOk
        );
        assert_eq!(
            after, count,
            "a failed restore leaves the session as it was"
        );

        assert_eq!(tandem_engine_free(engine), TandemStatus::TandemErrBusy);
        assert_eq!(tandem_session_free(session), TandemStatus::TandemOk);
        assert_eq!(tandem_engine_free(engine), TandemStatus::TandemOk);
    }
}
