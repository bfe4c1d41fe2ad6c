//! Checks of the pointer arguments C passes in.

use std::ffi::{c_char, CStr};

use crate::status::{Failure, TandemStatus};

/// A required string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and
/// unchanged for `'a`.
pub(crate) unsafe fn text<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, Failure> {
    // SAFETY: the caller's contract above.
    let text = unsafe { optional_text(ptr, name) }?;
    text.ok_or_else(|| null(name))
}

/// A string argument that may be NULL.
///
/// # Safety
/// As [`text`].
pub(crate) unsafe fn optional_text<'a>(
    ptr: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, Failure> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: `ptr` is not NULL and, by the caller's contract, NUL-terminated.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes.to_str().map(Some).map_err(|_| {
        Failure::new(
            TandemStatus::TandemErrInvalidUtf8,
            format!("{name} is not valid UTF-8"),
        )
    })
}

/// The error of a NULL argument.
pub(crate) fn null(name: &str) -> Failure {
    Failure::new(
        TandemStatus::TandemErrNullArgument,
        format!("{name} is NULL"),
    )
}

/// Stores `value` through the out-parameter `out`.
///
/// # Safety
/// `out` is NULL or valid for writing one `T`.
pub(crate) unsafe fn store<T>(out: *mut T, value: T, name: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(null(name));
    }
    // SAFETY: `out` is not NULL and, by the caller's contract, writable.
    unsafe { out.write(value) };
    Ok(())
}
