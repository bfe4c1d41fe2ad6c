//! Page-locked host buffers for the transfers of the split step: queries and
//! evicted rows going to the CPU workers, partials coming back. The copy
//! engines move page-locked memory asynchronously, on the device's copy
//! stream, where pageable memory would go through the driver's bounce buffer
//! and block the host for the whole transfer.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice};
use cudarc::driver::{DevicePtr, ValidAsZeroBits};

use crate::error::CudaError;

/// The capacity a staging buffer of `have` elements grows to for `need`:
/// `None` when it is large enough, else the next power of two (so that a run
/// of growing requests reallocates only a logarithmic number of times);
/// `Err` when that would overflow.
pub(crate) fn grown_capacity(need: usize, have: usize) -> Result<Option<usize>, CudaError> {
    if need <= have {
        return Ok(None);
    }
    need.checked_next_power_of_two()
        .filter(|n| n.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize))
        .map(Some)
        .ok_or_else(|| CudaError::Unavailable(format!("a staging buffer of {need} elements")))
}

/// A page-locked host buffer that grows on demand and is reused across steps.
pub(crate) struct Pinned<T> {
    ctx: Arc<CudaContext>,
    buf: Option<PinnedHostSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> Pinned<T> {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Pinned<T> {
        Pinned {
            ctx: ctx.clone(),
            buf: None,
        }
    }

    /// The buffer, holding at least `len` elements.
    fn room(&mut self, len: usize) -> Result<&mut PinnedHostSlice<T>, CudaError> {
        let have = self.buf.as_ref().map_or(0, PinnedHostSlice::len);
        if let Some(capacity) = grown_capacity(len.max(1), have)? {
            // Dropped first: the old allocation waits for its last copy.
            self.buf = None;
            // SAFETY: the capacity was checked against overflow above; the
            // contents are only read after a copy into them completes
            // (`download`), or after they are written (`upload`). No flags:
            // the host reads these buffers, and write-combined memory is slow
            // to read.
            self.buf = Some(unsafe { self.ctx.alloc_pinned_with_flags::<T>(capacity, 0) }?);
        }
        self.buf
            .as_mut()
            .ok_or_else(|| CudaError::Unavailable("a staging buffer".into()))
    }

    /// Copies `src` into `dst` through this buffer on `copies`; the host waits
    /// for this copy alone, not for the work queued after it on other streams.
    /// The copy stream waits for the kernels that wrote `src` (cudarc's event
    /// tracking), so the result is what they left.
    pub(crate) fn download<S: DevicePtr<T>>(
        &mut self,
        copies: &Arc<CudaStream>,
        src: &S,
        dst: &mut Vec<T>,
    ) -> Result<(), CudaError> {
        let n = src.len();
        let host = self.room(n)?;
        copies.memcpy_dtoh(src, host)?;
        let done = host.as_slice()?;
        dst.extend_from_slice(&done[..n]);
        Ok(())
    }

    /// Copies `src` to the GPU through this buffer on `copies`, into `scratch`
    /// (grown to this buffer's capacity); the host does not wait for the copy.
    /// Kernels that read the result on another stream wait for it through
    /// cudarc's event tracking. Returns the length of the data in `scratch`.
    pub(crate) fn upload(
        &mut self,
        copies: &Arc<CudaStream>,
        src: &[T],
        scratch: &mut Option<CudaSlice<T>>,
    ) -> Result<usize, CudaError> {
        let host = self.room(src.len())?;
        // Waits for the previous upload from this buffer to be consumed.
        host.as_mut_slice()?[..src.len()].copy_from_slice(src);
        let capacity = host.len();
        if scratch.as_ref().is_none_or(|s| s.len() != capacity) {
            // SAFETY: written whole by the copy below before any read.
            *scratch = Some(unsafe { copies.alloc::<T>(capacity) }?);
        }
        if let Some(device) = scratch.as_mut() {
            copies.memcpy_htod(host, device)?;
        }
        Ok(src.len())
    }
}

/// The split step's staging buffers, one per direction and kind.
pub(crate) struct Staging {
    /// Queries and other activations going to the host.
    pub(crate) activations: Pinned<f32>,
    /// Evicted key and value rows going to the host, as bf16 bits.
    pub(crate) rows: Pinned<u16>,
    /// The workers' partial outputs and log-sum-exps coming back.
    pub(crate) outputs: Pinned<f32>,
    pub(crate) lses: Pinned<f32>,
    /// Where the partials land on the GPU.
    pub(crate) device_outputs: Option<CudaSlice<f32>>,
    pub(crate) device_lses: Option<CudaSlice<f32>>,
}

impl Staging {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Staging {
        Staging {
            activations: Pinned::new(ctx),
            rows: Pinned::new(ctx),
            outputs: Pinned::new(ctx),
            lses: Pinned::new(ctx),
            device_outputs: None,
            device_lses: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::grown_capacity;

    #[test]
    fn staging_grows_by_powers_of_two_and_refuses_overflow() {
        assert_eq!(grown_capacity(10, 16).ok(), Some(None));
        assert_eq!(grown_capacity(17, 16).ok(), Some(Some(32)));
        assert_eq!(grown_capacity(1, 0).ok(), Some(Some(1)));
        assert_eq!(grown_capacity(4096, 1000).ok(), Some(Some(4096)));
        assert!(grown_capacity(usize::MAX / 2, 0).is_err());
        assert!(grown_capacity(usize::MAX, 0).is_err());
    }
}
