//! Memory hints for large, randomly accessed buffers.

/// Asks the kernel to back the pages of `buf` with transparent huge pages
/// (Linux `madvise(MADV_HUGEPAGE)`; a no-op elsewhere, and errors are
/// ignored: it is only a hint). Random row reads over hundreds of megabytes of
/// KV rows otherwise pay a TLB miss and a page walk per row. Call it on a
/// buffer's full capacity **before** writing to it, so that the first touch
/// already faults in huge pages.
pub fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `buf`'s allocation; MADV_HUGEPAGE
            // changes no contents and no access rights.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// [`advise_huge_pages`] on the spare capacity of a vector (the part not yet
/// written), so that growing it into that space faults in huge pages.
pub fn advise_huge_pages_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    advise_huge_pages(spare);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_is_harmless() {
        let mut v: Vec<u32> = Vec::with_capacity(3 << 20);
        advise_huge_pages_spare(&mut v);
        v.extend(0..3 << 20);
        advise_huge_pages(&v);
        advise_huge_pages::<u8>(&[]);
        assert_eq!(v[12345], 12345);
    }
}
