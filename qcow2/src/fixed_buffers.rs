//! The table of memory registered with an io_uring as fixed buffers: which registered buffer,
//! if any, holds a request's iovecs. The kernel pins registered memory once, so reads and
//! writes into it skip pinning (and, for reads, dirtying) every page of every request.

/// Largest buffer the kernel registers (io_uring refuses more than 1 GiB per buffer).
pub const MAX_BUFFER: usize = 1 << 30;

/// Registered buffers by index: `(start address, length)`, sorted by address.
#[derive(Debug, Default)]
pub struct FixedBuffers {
    buffers: Vec<(usize, usize)>,
}

impl FixedBuffers {
    /// The buffers that cover `regions` (`(start address, length)`), each region cut into
    /// pieces of at most [`MAX_BUFFER`] bytes; their order is the registration order.
    pub fn new(regions: &[(usize, usize)]) -> FixedBuffers {
        let mut buffers: Vec<(usize, usize)> = regions
            .iter()
            .filter(|&&(_, len)| len > 0)
            .flat_map(|&(start, len)| {
                (0..len)
                    .step_by(MAX_BUFFER)
                    .map(move |off| (start + off, (len - off).min(MAX_BUFFER)))
            })
            .collect();
        buffers.sort_unstable();
        FixedBuffers { buffers }
    }

    /// The buffers as iovecs, for `io_uring_register`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.buffers
            .iter()
            .map(|&(start, len)| libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: len,
            })
            .collect()
    }

    /// The index of the one buffer that holds every byte of `vecs`, if there is one.
    pub fn holding(&self, vecs: &[libc::iovec]) -> Option<u16> {
        let first = vecs.first()?;
        let index = self.containing(first.iov_base as usize)?;
        let (start, len) = self.buffers[index];
        let inside = |v: &libc::iovec| {
            let base = v.iov_base as usize;
            base >= start
                && base
                    .checked_add(v.iov_len)
                    .is_some_and(|end| end <= start + len)
        };
        if vecs.iter().all(inside) {
            u16::try_from(index).ok()
        } else {
            None
        }
    }

    /// The index of the buffer whose range holds `addr`.
    fn containing(&self, addr: usize) -> Option<usize> {
        let after = self.buffers.partition_point(|&(start, _)| start <= addr);
        let index = after.checked_sub(1)?;
        let (start, len) = self.buffers[index];
        (addr < start + len).then_some(index)
    }

    /// Whether no memory is registered.
    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn regions_are_cut_into_registrable_pieces() {
        let b = FixedBuffers::new(&[(0x9000_0000_0000, 3 * MAX_BUFFER / 2), (0x1000, 0x2000)]);
        assert_eq!(
            b.buffers,
            vec![
                (0x1000, 0x2000),
                (0x9000_0000_0000, MAX_BUFFER),
                (0x9000_0000_0000 + MAX_BUFFER, MAX_BUFFER / 2),
            ]
        );
        assert_eq!(b.iovecs().len(), 3);
        assert!(FixedBuffers::new(&[(0x1000, 0)]).is_empty());
    }

    #[test]
    fn a_request_maps_to_the_buffer_that_holds_all_of_it() {
        let big = 0x7f00_0000_0000usize;
        let b = FixedBuffers::new(&[(0x10000, 0x10000), (big, 2 * MAX_BUFFER)]);
        assert_eq!(b.holding(&[iov(0x10000, 0x10000)]), Some(0));
        assert_eq!(
            b.holding(&[iov(0x12000, 512), iov(0x1f000, 0x1000)]),
            Some(0)
        );
        assert_eq!(b.holding(&[iov(big + MAX_BUFFER, 4096)]), Some(2));
        // Past the end, before the start, across two pieces, split between two buffers.
        assert_eq!(b.holding(&[iov(0x1f000, 0x1001)]), None);
        assert_eq!(b.holding(&[iov(0xf000, 0x1000)]), None);
        assert_eq!(b.holding(&[iov(big + MAX_BUFFER - 512, 1024)]), None);
        assert_eq!(b.holding(&[iov(0x10000, 512), iov(big, 512)]), None);
        assert_eq!(b.holding(&[iov(usize::MAX - 10, 100)]), None);
        assert_eq!(b.holding(&[]), None);
    }
}
