//! The `device` argument of `tandem_engine_load`: `auto` reports what it
//! chose and why it fell back, `cuda` without a usable GPU (or without CUDA
//! built in) is a status and a message, and unknown names are refused.

use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut};

use tandem::*;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn c(text: &str) -> CString {
    CString::new(text).expect("no NUL")
}

fn read(text: *const c_char) -> String {
    assert!(!text.is_null());
    // SAFETY: a NUL-terminated string the engine or the thread still owns.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// What loading on `device` gives: the status, then the device's name and
/// fallback reason on success, or the error message.
fn load_on(device: &str) -> (TandemStatus, String, String) {
    let (model, device) = (c(MODEL), c(device));
    let mut engine = null_mut();
    // SAFETY: valid strings and a writable out-pointer; the engine is freed
    // after its texts are copied.
    unsafe {
        let status = tandem_engine_load(model.as_ptr(), device.as_ptr(), null(), &mut engine);
        if status != TandemStatus::TandemOk {
            return (status, read(tandem_last_error_message()), String::new());
        }
        let name = read(tandem_engine_device(engine));
        let fallback = read(tandem_engine_device_fallback(engine));
        assert_eq!(tandem_engine_free(engine), TandemStatus::TandemOk);
        (status, name, fallback)
    }
}

#[test]
fn cpu_is_the_cpu() {
    let (status, name, fallback) = load_on("cpu");
    assert_eq!(status, TandemStatus::TandemOk, "{name}");
    assert!(name.starts_with("cpu ("), "{name}");
    assert_eq!(fallback, "");
}

#[test]
fn auto_and_cuda_agree_on_whether_a_gpu_is_usable() {
    let (status, auto, fallback) = load_on("auto");
    assert_eq!(status, TandemStatus::TandemOk, "{auto}");
    let (cuda_status, cuda, _) = load_on("cuda");
    if auto.starts_with("cuda (") {
        assert_eq!(fallback, "");
        assert_eq!(cuda_status, TandemStatus::TandemOk, "{cuda}");
        assert!(cuda.starts_with("cuda ("), "{cuda}");
        return;
    }
    assert!(auto.starts_with("cpu ("), "{auto}");
    assert!(!fallback.is_empty(), "auto says why it chose the CPU");
    if cfg!(feature = "cuda") {
        assert_eq!(cuda_status, TandemStatus::TandemErrNoDevice, "{cuda}");
        assert!(cuda.contains("no usable GPU"), "{cuda}");
        assert!(cuda.contains(&fallback), "{cuda} / {fallback}");
    } else {
        assert_eq!(cuda_status, TandemStatus::TandemErrInvalidArgument);
        assert!(cuda.contains("built without CUDA"), "{cuda}");
    }
}

#[test]
fn unknown_devices_are_refused() {
    for name in ["tpu", "CUDA", ""] {
        let (status, message, _) = load_on(name);
        assert_eq!(status, TandemStatus::TandemErrInvalidArgument, "{name:?}");
        assert!(
            message.contains("expected \"auto\", \"cpu\" or \"cuda\""),
            "{message}"
        );
    }
}

#[test]
fn a_null_engine_has_no_device() {
    // SAFETY: NULL is allowed.
    unsafe {
        assert!(tandem_engine_device(null()).is_null());
        assert!(tandem_engine_device_fallback(null()).is_null());
    }
}
