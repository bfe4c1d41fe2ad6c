//! Status codes, the thread's last error message, and the guard every entry
//! point runs in so that no panic unwinds into C.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tandem_device::DeviceError;
use tandem_runtime::Error;

/// What a `tandem_*` function reports; on anything but `TANDEM_OK`,
/// `tandem_last_error_message()` says more.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TandemStatus {
    /// Success.
    TandemOk = 0,
    /// A pointer argument that must not be NULL was NULL.
    TandemErrNullArgument = 1,
    /// A string argument is not valid UTF-8.
    TandemErrInvalidUtf8 = 2,
    /// An argument or request is invalid (an unknown device or policy, a full
    /// context, nothing to generate from, ...).
    TandemErrInvalidArgument = 3,
    /// A file could not be read or written (e.g. the model file is missing).
    TandemErrIo = 4,
    /// The model file is damaged or unsupported.
    TandemErrBadModel = 5,
    /// A session file is damaged, or was saved with another model or policy.
    TandemErrSessionFile = 6,
    /// The work was stopped by `tandem_session_cancel`.
    TandemErrCancelled = 7,
    /// The handle is in use: a session busy on another thread, or an engine
    /// that still has sessions.
    TandemErrBusy = 8,
    /// The runtime failed (device or CPU attention error, or an internal bug).
    TandemErrInternal = 9,
    /// The device asked for is not available (no NVIDIA driver, no usable
    /// GPU, or a CUDA library missing).
    TandemErrNoDevice = 10,
}

/// An error on its way to C: its status and message.
pub(crate) struct Failure {
    pub(crate) status: TandemStatus,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: TandemStatus, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match e {
            Error::Io { .. } => TandemStatus::TandemErrIo,
            Error::BadModel { .. }
            | Error::Unsupported { .. }
            | Error::Tokenizer(_)
            | Error::ChatTemplate(_) => TandemStatus::TandemErrBadModel,
            Error::InvalidRequest(_) => TandemStatus::TandemErrInvalidArgument,
            Error::SessionFile { .. } => TandemStatus::TandemErrSessionFile,
            Error::Cancelled => TandemStatus::TandemErrCancelled,
            _ => TandemStatus::TandemErrInternal,
        };
        Failure::new(status, e.to_string())
    }
}

impl From<DeviceError> for Failure {
    fn from(e: DeviceError) -> Failure {
        match e {
            DeviceError::Unknown(_) => {
                Failure::new(TandemStatus::TandemErrInvalidArgument, e.to_string())
            }
            DeviceError::NotBuilt => Failure::new(
                TandemStatus::TandemErrInvalidArgument,
                "device \"cuda\": this library was built without CUDA \
                 (build tandem-capi with --features cuda)",
            ),
            DeviceError::Unavailable(why) => Failure::new(
                TandemStatus::TandemErrNoDevice,
                format!("device \"cuda\": no usable GPU: {why}"),
            ),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "?")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs an entry point's body: records its error as this thread's last error
/// and turns a panic into `TANDEM_ERR_INTERNAL`.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> TandemStatus {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            return TandemStatus::TandemOk;
        }
        Ok(Err(failure)) => failure,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Failure::new(
                TandemStatus::TandemErrInternal,
                format!("internal error (a panic): {what}"),
            )
        }
    };
    set_last_error(&failure.message);
    failure.status
}

/// The message of the last failed `tandem_*` call on this thread ("" after a
/// success). The text stays valid until the thread's next `tandem_*` call.
#[no_mangle]
pub extern "C" fn tandem_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: the pointer is this thread's message, alive until the next call.
        unsafe { CStr::from_ptr(tandem_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let status = guard(|| panic!("out of bounds"));
        assert_eq!(status, TandemStatus::TandemErrInternal);
        assert!(last_error().contains("out of bounds"), "{}", last_error());
        assert_eq!(guard(|| Ok(())), TandemStatus::TandemOk);
        assert_eq!(last_error(), "");
    }
}
