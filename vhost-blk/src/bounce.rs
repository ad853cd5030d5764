//! A page-aligned scratch buffer, so that I/O through it also works with O_DIRECT.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// Alignment of the buffer: a page, which satisfies O_DIRECT on any block size.
pub const ALIGN: usize = 4096;

/// A zero-initialised, page-aligned heap buffer of fixed length.
pub struct BounceBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory; access goes through `&mut self`.
unsafe impl Send for BounceBuffer {}

impl BounceBuffer {
    /// Allocates `len` bytes (`len` must be non-zero and at most `isize::MAX - ALIGN`).
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .unwrap_or_else(|_| panic!("bounce buffer of {len} bytes is too large"));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        BounceBuffer { ptr, layout }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Whether the buffer is empty (never: the length is at least one).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first `len` bytes (at most the buffer length).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len());
        // SAFETY: `ptr` points to `layout.size()` initialised bytes that we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = BounceBuffer::new(8192);
        assert_eq!(b.len(), 8192);
        let s = b.slice_mut(100_000);
        assert_eq!(s.len(), 8192);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
        assert!(s.iter().all(|&x| x == 0));
    }
}
