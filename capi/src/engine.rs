//! `TandemEngine`: a loaded model, its tokenizer and attention policy, on
//! the dense device asked for.

use std::ffi::{c_char, CString};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_device::{run_on, DeviceChoice, DeviceTask};
use tandem_gpu::DenseDevice;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{Engine, EngineOptions};

use crate::any_device::AnyEngine;
use crate::args::{null, optional_text, text};
use crate::status::{guard, Failure, TandemStatus};

/// A loaded model (opaque). Free it with `tandem_engine_free` after all its
/// sessions.
pub struct TandemEngine {
    pub(crate) engine: Box<dyn AnyEngine>,
    /// The dense device's name.
    device: CString,
    /// Why `"auto"` chose the CPU ("" when it did not fall back).
    fallback: CString,
    /// Sessions not yet freed; the engine cannot be freed while any live.
    pub(crate) sessions: AtomicUsize,
}

/// Loads a model.
///
/// `model_path`: a GGUF file or a Hugging Face Llama directory. `device`:
/// `"auto"` (CUDA when the library is built with it and a driver and a usable
/// GPU are present, else the CPU; `tandem_engine_device_fallback` says why),
/// `"cpu"` (NULL means `"cpu"`) or `"cuda"` (`TANDEM_ERR_INVALID_ARGUMENT`
/// when the library is built without CUDA, `TANDEM_ERR_NO_DEVICE` when no
/// usable GPU is present). `policy`: an attention policy as `tandem --policy`
/// takes it (NULL: the default). On success `*out_engine` holds the engine;
/// `tandem_engine_device` names the device it runs on.
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

/// Loading a model onto whichever device is chosen.
struct Load<'a> {
    path: &'a Path,
    options: &'a EngineOptions,
}

impl DeviceTask for Load<'_> {
    type Output = tandem_runtime::Result<Box<dyn AnyEngine>>;

    fn run<D: DenseDevice + 'static>(self, device: D) -> Self::Output {
        let engine = Engine::load_on(self.path, device, self.options)?;
        Ok(Box::new(engine))
    }
}

fn load(path: &str, device: &str, policy: Option<&str>) -> Result<TandemEngine, Failure> {
    let choice: DeviceChoice = device.parse()?;
    let mut options = EngineOptions::default();
    if let Some(policy) = policy {
        options.policy = PolicyConfig {
            policy: policy.to_string(),
            ..PolicyConfig::default()
        };
    }
    let task = Load {
        path: Path::new(path),
        options: &options,
    };
    let mut fallback = String::new();
    let engine = run_on(choice, options.threads, task, |why| {
        fallback = why.to_string();
    })??;
    Ok(TandemEngine {
        device: c_string(engine.device_name()),
        fallback: c_string(fallback),
        engine,
        sessions: AtomicUsize::new(0),
    })
}

fn c_string(text: String) -> CString {
    CString::new(text.replace('\0', "?")).unwrap_or_default()
}

/// The name of the dense device `engine` runs on, e.g. `"cpu (avx512, 8
/// threads)"` or `"cuda (NVIDIA H100 80GB HBM3 (sm_90, 79 GiB))"`; NULL when
/// `engine` is NULL. The text lives as long as the engine.
///
/// # Safety
/// `engine` is NULL or a live engine handle.
#[no_mangle]
pub unsafe extern "C" fn tandem_engine_device(engine: *const TandemEngine) -> *const c_char {
    // SAFETY: a live engine handle or NULL, by the caller's contract.
    unsafe { engine.as_ref() }.map_or(ptr::null(), |e| e.device.as_ptr())
}

/// Why `"auto"` loaded `engine` on the CPU rather than CUDA (e.g. no NVIDIA
/// driver, no GPU, or a library built without CUDA); `""` when the device
/// was not chosen by falling back. NULL when `engine` is NULL. The text
/// lives as long as the engine.
///
/// # Safety
/// `engine` is NULL or a live engine handle.
#[no_mangle]
pub unsafe extern "C" fn tandem_engine_device_fallback(
    engine: *const TandemEngine,
) -> *const c_char {
    // SAFETY: a live engine handle or NULL, by the caller's contract.
    unsafe { engine.as_ref() }.map_or(ptr::null(), |e| e.fallback.as_ptr())
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
