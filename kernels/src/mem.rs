//! Memory for large buffers: huge-page hints, huge-page-aligned buffers, and
//! read-only memory-mapped files.

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

/// Element types a [`HugeBuf`] may hold: plain `Copy` values with no drop glue.
pub trait Plain: Copy + Send + Sync + 'static + private::Sealed {}

mod private {
    pub trait Sealed {}
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl private::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(i8, u8, u16, u32, u64, f32, half::bf16, half::f16);

/// The huge-page size the buffers align to (x86-64 and aarch64 Linux default).
pub const HUGE_PAGE: usize = 2 << 20;

/// Allocation failed: the system is out of memory (or address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory {
    /// Bytes requested.
    pub bytes: usize,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of memory allocating {} bytes", self.bytes)
    }
}

impl std::error::Error for OutOfMemory {}

/// A fixed-capacity buffer of plain values, aligned to [`HUGE_PAGE`] when it
/// is at least that large, so that the kernel can back it with transparent
/// huge pages from the first write.
///
/// It never reallocates: a store built of such blocks grows by adding blocks,
/// with no copy of what it holds (a 96k-token KV store of many gigabytes would
/// otherwise be copied whole by the first append after it was loaded). Pages
/// are taken from the OS only when first written.
pub struct HugeBuf<T: Plain> {
    ptr: std::ptr::NonNull<T>,
    cap: usize,
    len: usize,
}

// SAFETY: a HugeBuf owns its allocation exclusively, like a Vec<T>, and T is
// Send + Sync.
unsafe impl<T: Plain> Send for HugeBuf<T> {}
// SAFETY: shared access only reads through `&[T]`.
unsafe impl<T: Plain> Sync for HugeBuf<T> {}

impl<T: Plain> HugeBuf<T> {
    /// An empty buffer with room for `cap` values. Buffers of a huge page or
    /// more are huge-page aligned and advised with [`advise_huge_pages`] when
    /// `huge` is true; pass false for a buffer that will be filled slowly, and
    /// call [`HugeBuf::advise`] on it later.
    pub fn with_capacity(cap: usize, huge: bool) -> Result<Self, OutOfMemory> {
        let layout = Self::layout(cap)?;
        if layout.size() == 0 {
            return Ok(HugeBuf {
                ptr: std::ptr::NonNull::dangling(),
                cap,
                len: 0,
            });
        }
        let raw = allocate(layout);
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).ok_or(OutOfMemory {
            bytes: layout.size(),
        })?;
        let buf = HugeBuf { ptr, cap, len: 0 };
        if huge {
            buf.advise();
        }
        Ok(buf)
    }

    fn layout(cap: usize) -> Result<std::alloc::Layout, OutOfMemory> {
        let bytes = cap
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(OutOfMemory { bytes: usize::MAX })?;
        let align = if bytes >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            std::mem::align_of::<T>()
        };
        std::alloc::Layout::from_size_align(bytes, align).map_err(|_| OutOfMemory { bytes })
    }

    /// Asks for huge pages over the whole capacity (see [`advise_huge_pages`]);
    /// pages already written are collapsed by the kernel in the background.
    pub fn advise(&self) {
        // SAFETY: the whole capacity is one live allocation; the slice is only
        // used for its address range (MaybeUninit needs no initialisation).
        let all = unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().cast::<std::mem::MaybeUninit<T>>(),
                self.cap,
            )
        };
        advise_huge_pages(all);
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values it can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Room left.
    pub fn spare(&self) -> usize {
        self.cap - self.len
    }

    /// Appends `f(x)` for each `x` of `src`, as many as fit; returns how many
    /// were taken.
    pub fn extend_map<S: Copy>(&mut self, src: &[S], mut f: impl FnMut(S) -> T) -> usize {
        let n = src.len().min(self.spare());
        for (i, &x) in src[..n].iter().enumerate() {
            // SAFETY: len + i < cap, inside the allocation; T is Copy (no drop).
            unsafe { self.ptr.as_ptr().add(self.len + i).write(f(x)) };
        }
        self.len += n;
        n
    }
}

/// Allocates `layout` (non-zero size); null when out of memory. On Linux a
/// block of a huge page or more is its own anonymous mapping, so that freeing
/// it returns its pages to the OS at once and no allocator arena keeps them.
fn allocate(layout: std::alloc::Layout) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if layout.align() == HUGE_PAGE {
        let bytes = layout.size().next_multiple_of(HUGE_PAGE);
        let Some(len) = bytes.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a fresh private anonymous mapping; the ends beyond the aligned
        // range (whole pages, as both are multiples of the page size) are unmapped
        // again, and nothing else refers to them.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            let start = p as usize;
            let aligned = start.next_multiple_of(HUGE_PAGE);
            let head = aligned - start;
            if head > 0 {
                libc::munmap(p, head);
            }
            let tail = len - head - bytes;
            if tail > 0 {
                libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
            }
            return aligned as *mut u8;
        }
    }
    // SAFETY: the caller passes a layout of non-zero size.
    unsafe { std::alloc::alloc(layout) }
}

/// Frees what [`allocate`] returned for `layout`.
///
/// # Safety
/// `p` must come from `allocate(layout)` and not be used afterwards.
unsafe fn release(p: *mut u8, layout: std::alloc::Layout) {
    #[cfg(target_os = "linux")]
    if layout.align() == HUGE_PAGE {
        let bytes = layout.size().next_multiple_of(HUGE_PAGE);
        // SAFETY: `p..p + bytes` is exactly the mapping `allocate` kept.
        unsafe { libc::munmap(p.cast(), bytes) };
        return;
    }
    // SAFETY: per this function's contract.
    unsafe { std::alloc::dealloc(p, layout) }
}

impl<T: Plain> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` values were written by `extend_map`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        if let Ok(layout) = Self::layout(self.cap) {
            if layout.size() > 0 {
                // SAFETY: allocated by `allocate` with this same layout.
                unsafe { release(self.ptr.as_ptr().cast(), layout) };
            }
        }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} of {})", self.len, self.cap)
    }
}

/// A file mapped read-only into memory, seen as a byte slice.
///
/// The pages are read from the file on first access and shared with the page
/// cache, so mapping a multi-gigabyte model file costs no copy and no up-front
/// read.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps the whole file at `path` read-only. An empty file gives an empty
    /// slice.
    ///
    /// The file must not be modified or truncated while it is mapped (see the
    /// SAFETY note in the body): callers map files they only read, such as
    /// model weights.
    pub fn open(path: impl AsRef<std::path::Path>) -> std::io::Result<MappedFile> {
        let file = std::fs::File::open(path)?;
        // SAFETY: `Mmap::map` is unsafe because the slice it yields assumes
        // the file's bytes do not change: if another process writes to or
        // truncates the file while it is mapped, reads see the new bytes (or
        // fault with SIGBUS past a truncated end). The map is read-only and
        // this process never writes the file; that no one else does while it
        // is mapped is the contract stated on this function, the same every
        // mmap-based loader relies on.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile { map })
    }

    /// The file's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.map.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_buffers_fill_to_capacity_and_align() {
        for cap in [0usize, 1, 777, (HUGE_PAGE / 4) + 3] {
            let mut b = HugeBuf::<u32>::with_capacity(cap, true).expect("alloc");
            assert_eq!(b.len(), 0);
            let src: Vec<u64> = (0..cap as u64 + 10).collect();
            let mut taken = b.extend_map(&src[..cap / 2], |x| x as u32);
            taken += b.extend_map(&src[cap / 2..], |x| x as u32);
            assert_eq!(taken, cap);
            assert_eq!(b.spare(), 0);
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u32));
            if cap * 4 >= HUGE_PAGE {
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
            }
            assert_eq!(b.extend_map(&[1u64], |x| x as u32), 0);
        }
    }

    #[test]
    fn absurd_sizes_are_an_error() {
        assert!(HugeBuf::<u64>::with_capacity(usize::MAX / 4, false).is_err());
        assert!(HugeBuf::<u64>::with_capacity(1 << 60, false).is_err());
    }

    #[test]
    fn advice_is_harmless() {
        let mut v: Vec<u32> = Vec::with_capacity(3 << 20);
        advise_huge_pages(v.spare_capacity_mut());
        v.extend(0..3 << 20);
        advise_huge_pages(&v);
        advise_huge_pages::<u8>(&[]);
        assert_eq!(v[12345], 12345);
    }

    #[test]
    fn a_mapped_file_reads_its_bytes() {
        let dir = std::env::temp_dir().join(format!("tandem-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.bin");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let map = MappedFile::open(&path).unwrap();
        assert_eq!(map.as_bytes(), &bytes[..]);
        assert_eq!(map.len(), bytes.len());
        assert_eq!(&map[100..104], &bytes[100..104]);

        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        assert!(MappedFile::open(&empty).unwrap().is_empty());

        let missing = MappedFile::open(dir.join("missing.bin")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
