//! `TandemEngine`: a loaded model, its tokenizer and attention policy.

use std::ffi::c_char;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{Engine, EngineOptions};

use crate::args::{null, optional_text, text};
use crate::status::{guard, Failure, TandemStatus};

/// A loaded model (opaque). Free it with `tandem_engine_free` after all its
/// sessions.
pub struct TandemEngine {
    pub(crate) engine: Engine,
    /// Sessions not yet freed; the engine cannot be freed while any live.
    pub(crate) sessions: AtomicUsize,
}

/// Loads a model.
///
/// `model_path`: a GGUF file or a Hugging Face Llama directory. `device`:
/// `"cpu"` (NULL means `"cpu"`; no other device is offered through this
/// interface). `policy`: an attention policy as `tandem --policy` takes it
/// (NULL: the default). On success `*out_engine` holds the engine.
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out_engine` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tandem_engine_load(
    model_path: *const c_char,
    device: *const c_char,
    policy: *const c_char,
    out_engine: *mut *mut TandemEngine,
) -> TandemStatus {
    guard(|| {
        if out_engine.is_null() {
            return Err(null("out_engine"));
        }
        // SAFETY: the caller's contract on the strings.
        let (path, device, policy) = unsafe {
            (
                text(model_path, "model_path")?,
                optional_text(device, "device")?,
                optional_text(policy, "policy")?,
            )
        };
        let engine = load(path, device.unwrap_or("cpu"), policy)?;
        let handle = Box::into_raw(Box::new(engine));
        // SAFETY: `out_engine` is not NULL and writable by the caller's contract.
        unsafe { out_engine.write(handle) };
        Ok(())
    })
}

fn load(path: &str, device: &str, policy: Option<&str>) -> Result<TandemEngine, Failure> {
    if device != "cpu" {
        return Err(Failure::new(
            TandemStatus::TandemErrInvalidArgument,
            format!("unknown device {device:?}; this interface offers \"cpu\""),
        ));
    }
    let mut options = EngineOptions::default();
    if let Some(policy) = policy {
        options.policy = PolicyConfig {
            policy: policy.to_string(),
            ..PolicyConfig::default()
        };
    }
    let engine = Engine::load(Path::new(path), &options)?;
    Ok(TandemEngine {
        engine,
        sessions: AtomicUsize::new(0),
    })
}

/// Frees an engine. Fails with `TANDEM_ERR_BUSY`, freeing nothing, while
/// sessions of it are alive. NULL is allowed and does nothing.
///
/// # Safety
/// `engine` is NULL or came from `tandem_engine_load` and was not freed yet,
/// and no other thread is calling a function on it meanwhile.
#[no_mangle]
pub unsafe extern "C" fn tandem_engine_free(engine: *mut TandemEngine) -> TandemStatus {
    guard(|| {
        if engine.is_null() {
            return Ok(());
        }
        // SAFETY: a live engine handle, by the caller's contract.
        let live = unsafe { &*engine }.sessions.load(Ordering::SeqCst);
        if live > 0 {
            return Err(Failure::new(
                TandemStatus::TandemErrBusy,
                format!("the engine still has {live} sessions; free them first"),
            ));
        }
        // SAFETY: it came from `Box::into_raw` in `tandem_engine_load`, and
        // no session refers to it any more.
        drop(unsafe { Box::from_raw(engine) });
        Ok(())
    })
}
