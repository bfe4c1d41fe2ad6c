//! `TandemSession`: one conversation, fed text and generating tokens.
//!
//! The last token of each prompt is held back from the prefill, so that
//! generation starts by running it and so has the next-token logits at hand.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use tandem_runtime::{Flow, SamplingConfig, SavedSession};

use crate::any_device::{AnyEngine, AnySession};
use crate::args::{null, text};
use crate::engine::TandemEngine;
use crate::status::{guard, Failure, TandemStatus};

/// Called during a prefill with the tokens done so far and the total.
pub type TandemProgressFn =
    Option<unsafe extern "C" fn(done: usize, total: usize, user_data: *mut c_void)>;

/// Called with each piece of generated text (`len` bytes of UTF-8, also
/// NUL-terminated); returning nonzero stops the generation, and the piece's
/// token is then not kept in the context.
pub type TandemTokenFn =
    Option<unsafe extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void) -> c_int>;

/// One conversation (opaque).
pub struct TandemSession {
    engine: &'static TandemEngine,
    cancel: AtomicBool,
    state: Mutex<State>,
}

struct State {
    session: Box<dyn AnySession>,
    /// Prompt tokens not yet run (at most the last one of a prompt).
    pending: Vec<u32>,
}

impl TandemSession {
    /// The session's state, unless another thread is using it.
    fn lock(&self) -> Result<MutexGuard<'_, State>, Failure> {
        self.state.try_lock().map_err(|e| match e {
            TryLockError::WouldBlock => Failure::new(
                TandemStatus::TandemErrBusy,
                "the session is in use on another thread",
            ),
            TryLockError::Poisoned(_) => Failure::new(
                TandemStatus::TandemErrInternal,
                "an earlier call on this session failed internally; free it",
            ),
        })
    }

    fn engine(&self) -> &'static dyn AnyEngine {
        &*self.engine.engine
    }

    /// Runs `body` on the state, then clears the cancel flag (so a cancel
    /// stops the running call, or else the next one).
    fn run(&self, body: impl FnOnce(&mut State) -> Result<(), Failure>) -> Result<(), Failure> {
        let result = self.lock().and_then(|mut state| body(&mut state));
        self.cancel.store(false, Ordering::SeqCst);
        result
    }

    fn check_cancel(&self) -> Result<(), Failure> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(tandem_runtime::Error::Cancelled.into());
        }
        Ok(())
    }
}

/// A session argument.
///
/// # Safety
/// `ptr` is NULL or a live session handle.
unsafe fn session_ref<'a>(ptr: *const TandemSession) -> Result<&'a TandemSession, Failure> {
    // SAFETY: a live handle or NULL, by the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| null("session"))
}

/// A progress callback as a closure (doing nothing when `f` is NULL).
fn progress_fn(f: TandemProgressFn, user_data: *mut c_void) -> impl FnMut(usize, usize) {
    move |done, total| {
        if let Some(f) = f {
            // SAFETY: the caller supplied `f` for this `user_data`.
            unsafe { f(done, total, user_data) }
        }
    }
}

/// Starts a conversation with `engine`; `*out_session` receives it.
///
/// # Safety
/// `engine` is NULL or a live engine handle; `out_session` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_new(
    engine: *const TandemEngine,
    out_session: *mut *mut TandemSession,
) -> TandemStatus {
    guard(|| {
        if out_session.is_null() {
            return Err(null("out_session"));
        }
        // SAFETY: a live engine or NULL. It outlives the session because
        // `tandem_engine_free` refuses while the session count is nonzero.
        let engine: &'static TandemEngine =
            unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))?;
        let session = engine.engine.session()?;
        engine.sessions.fetch_add(1, Ordering::SeqCst);
        let handle = Box::into_raw(Box::new(TandemSession {
            engine,
            cancel: AtomicBool::new(false),
            state: Mutex::new(State {
                session,
                pending: Vec::new(),
            }),
        }));
        // SAFETY: `out_session` is not NULL and writable by the caller's contract.
        unsafe { out_session.write(handle) };
        Ok(())
    })
}

/// Frees a session. NULL is allowed and does nothing.
///
/// # Safety
/// `session` is NULL or a live session handle that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_free(session: *mut TandemSession) -> TandemStatus {
    guard(|| {
        if session.is_null() {
            return Ok(());
        }
        // SAFETY: it came from `Box::into_raw` in `tandem_session_new`.
        let session = unsafe { Box::from_raw(session) };
        let engine = session.engine;
        drop(session);
        engine.sessions.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    })
}

/// Adds `text` (tokenized as is; special tokens such as `<|im_start|>` are
/// recognized) to the context, calling `progress` (may be NULL) as it goes.
/// `tandem_session_cancel` stops it between chunks; then the text is dropped
/// again and the result is `TANDEM_ERR_CANCELLED`.
///
/// # Safety
/// `session` is NULL or a live session handle; `text` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_prefill(
    session: *const TandemSession,
    text_utf8: *const c_char,
    progress: TandemProgressFn,
    user_data: *mut c_void,
) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract on both pointers.
        let (s, text) = unsafe { (session_ref(session)?, text(text_utf8, "text")?) };
        s.run(|state| {
            s.check_cancel()?;
            let tokenizer = s.engine().tokenizer();
            let fresh = state.session.tokens().is_empty() && state.pending.is_empty();
            let ids = tokenizer.encode(text, fresh && tokenizer.add_bos_by_default())?;
            let mut all = state.pending.clone();
            all.extend(ids);
            let mut progress = progress_fn(progress, user_data);
            let Some((&last, run)) = all.split_last() else {
                return Ok(());
            };
            if !run.is_empty() {
                state.session.prefill_cancellable(
                    run,
                    &mut |done, _| progress(done, all.len()),
                    Some(&s.cancel),
                )?;
            }
            state.pending = vec![last];
            progress(all.len(), all.len());
            Ok(())
        })
    })
}

/// Generates up to `max_tokens` tokens after the prefilled prompt, calling
/// `on_token` (may be NULL) with each piece of text. `temperature` 0 is greedy;
/// `seed` seeds sampling. Stops at the end of the model's turn, at the context
/// limit, when `on_token` returns nonzero, or on `tandem_session_cancel`
/// (then `TANDEM_ERR_CANCELLED`; the tokens so far stay in the context).
/// A prompt must be prefilled before each generation.
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_generate(
    session: *const TandemSession,
    max_tokens: usize,
    temperature: f32,
    seed: u64,
    on_token: TandemTokenFn,
    user_data: *mut c_void,
) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { session_ref(session)? };
        let sampling = SamplingConfig {
            temperature,
            seed,
            ..SamplingConfig::default()
        };
        s.run(|state| {
            s.check_cancel()?;
            if state.pending.is_empty() {
                return Err(Failure::new(
                    TandemStatus::TandemErrInvalidArgument,
                    "nothing to generate from: prefill a prompt first",
                ));
            }
            let before = state.session.tokens().len();
            let result = state.session.generate(
                &state.pending,
                max_tokens,
                &sampling,
                Some(&s.cancel),
                &mut |piece| emit(on_token, user_data, piece),
            );
            if state.session.tokens().len() > before {
                state.pending.clear();
            }
            result?;
            s.check_cancel()
        })
    })
}

fn emit(on_token: TandemTokenFn, user_data: *mut c_void, piece: &str) -> Flow {
    let Some(f) = on_token else {
        return Flow::Continue;
    };
    let text = CString::new(piece.replace('\0', "")).unwrap_or_default();
    // SAFETY: the caller supplied `f` for this `user_data`; `text` lives
    // through the call.
    let stop = unsafe { f(text.as_ptr(), text.as_bytes().len(), user_data) };
    if stop == 0 {
        Flow::Continue
    } else {
        Flow::Stop
    }
}

/// Asks the session's running prefill, generation or restore to stop (or, if
/// none runs, the next one). Safe to call from any thread while another uses
/// the session.
///
/// # Safety
/// `session` is NULL or a live session handle.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_cancel(session: *const TandemSession) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { session_ref(session)? };
        s.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// Tokens in the session's context (counting a prefilled prompt's last token,
/// which generation runs first) into `*out_count`.
///
/// # Safety
/// `session` is NULL or a live session handle; `out_count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_token_count(
    session: *const TandemSession,
    out_count: *mut usize,
) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { session_ref(session)? };
        let state = s.lock()?;
        let count = state.session.tokens().len() + state.pending.len();
        // SAFETY: the caller's contract.
        unsafe { crate::args::store(out_count, count, "out_count") }
    })
}

/// Saves the session's tokens, keys and values to `path` crash-safely (a
/// temporary file, flushed, renamed over `path`), tied to the engine's model
/// and policy.
///
/// # Safety
/// `session` is NULL or a live session handle; `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_save(
    session: *const TandemSession,
    path: *const c_char,
) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract on both pointers.
        let (s, path) = unsafe { (session_ref(session)?, text(path, "path")?) };
        s.run(|state| {
            let mut tokens = state.session.tokens().to_vec();
            tokens.extend(&state.pending);
            let saved = SavedSession {
                tokens,
                ..SavedSession::default()
            };
            Ok(state.session.save_state(Path::new(path), &saved)?)
        })
    })
}

/// Replaces the session's conversation with the one saved in `path`, loading
/// its saved keys and values without running the model (a file without them
/// runs its tokens through a prefill, reporting to `progress`, which may be
/// NULL; cancellable). A damaged file, or one saved with another model or policy,
/// gives `TANDEM_ERR_SESSION_FILE`. On any failure the session is unchanged.
///
/// # Safety
/// `session` is NULL or a live session handle; `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tandem_session_restore(
    session: *const TandemSession,
    path: *const c_char,
    progress: TandemProgressFn,
    user_data: *mut c_void,
) -> TandemStatus {
    guard(|| {
        // SAFETY: the caller's contract on both pointers.
        let (s, path) = unsafe { (session_ref(session)?, text(path, "path")?) };
        s.run(|state| {
            let engine = s.engine();
            let saved = engine.load_session(Path::new(path))?;
            s.check_cancel()?;
            let mut progress = progress_fn(progress, user_data);
            let total = saved.tokens.len();
            let covered = saved.state.as_ref().map_or(0, |state| state.tokens());
            // The last token not in the saved state waits, as after a prefill.
            let (run, pending) = match saved.tokens.split_last() {
                Some((&last, run)) if total > covered => (run.to_vec(), vec![last]),
                _ => (saved.tokens.clone(), Vec::new()),
            };
            let saved = SavedSession {
                tokens: run,
                ..saved
            };
            let session = engine.restore_session(&saved, Some(&s.cancel), &mut |done, _| {
                progress(done, total)
            })?;
            progress(total, total);
            *state = State { session, pending };
            Ok(())
        })
    })
}
