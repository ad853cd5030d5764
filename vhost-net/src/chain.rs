//! Validating untrusted descriptor chains into lists of guest buffers, and turning those into
//! `iovec`s for readv/writev on the TAP.
//!
//! A tx chain is a vnet header followed by an Ethernet frame, all in device-readable buffers;
//! an rx chain is device-writable buffers the device fills with a vnet header and a frame.
//! The header may span descriptors (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1). Every buffer
//! must lie in guest memory and point the right way; a chain that loops, is longer than the
//! queue, or names a descriptor outside the table is rejected as a whole. Nothing here panics
//! or touches memory outside the guest's regions, whatever the chain holds.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::MS;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
};

use crate::error::{Error, Result};

/// Most buffers one chain may have: the kernel's IOV_MAX for one readv/writev.
pub const MAX_BUFFERS: usize = 1024;

/// Largest Ethernet frame the TAP exchanges: a 64 KiB GSO packet plus an Ethernet header and a
/// VLAN tag.
pub const MAX_FRAME_LEN: u64 = 65535 + 14 + 4;

/// A guest buffer checked to lie entirely inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// Total length of `segs` in bytes.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks `chain`, checks that every buffer lies in guest memory and is device-writable
/// (`writable`) or device-readable, and appends the non-empty ones to `out`. Returns the
/// number of bytes added.
pub fn collect<D>(chain: DescriptorChain<D>, writable: bool, out: &mut Vec<Segment>) -> Result<u64>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    let start = out.len();
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut first_error = None;
    let mut total = 0u64;
    for (index, desc) in chain.clone().enumerate() {
        if index == MAX_BUFFERS {
            // Not walked further: an indirect table may hold 65535 descriptors.
            out.truncate(start);
            return Err(Error::TooManyBuffers {
                head,
                max: MAX_BUFFERS,
            });
        }
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            first_error.get_or_insert(Error::WrongDirection { head, index });
            continue;
        }
        let len = desc.len();
        if len == 0 {
            continue;
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), len as usize, access) {
            first_error.get_or_insert(Error::OutOfGuestMemory {
                index,
                addr: desc.addr().0,
                len,
            });
            continue;
        }
        total += u64::from(len);
        out.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    // An iterator that stopped on a descriptor with NEXT set ran into a loop, a chain longer
    // than the queue, a bad next index or an unreadable descriptor.
    let error = if count == 0 || last_has_next {
        Some(Error::BrokenChain { head })
    } else {
        first_error
    };
    if let Some(e) = error {
        out.truncate(start);
        return Err(e);
    }
    Ok(total)
}

/// Parses a tx chain: device-readable buffers holding a `hdr_len`-byte vnet header and a frame
/// of at most [`MAX_FRAME_LEN`] bytes. Appends the buffers to `out` and returns the length.
pub fn parse_tx<D>(chain: DescriptorChain<D>, hdr_len: usize, out: &mut Vec<Segment>) -> Result<u64>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let start = out.len();
    let len = collect(chain, false, out)?;
    let max = hdr_len as u64 + MAX_FRAME_LEN;
    let error = if len < hdr_len as u64 {
        Error::ChainTooShort { head, len, hdr_len }
    } else if len > max {
        Error::FrameTooLong { head, len, max }
    } else {
        return Ok(len);
    };
    out.truncate(start);
    Err(error)
}

/// Parses an rx chain: device-writable buffers with room for at least the vnet header. Appends
/// the buffers to `out` and returns their capacity.
pub fn parse_rx<D>(chain: DescriptorChain<D>, hdr_len: usize, out: &mut Vec<Segment>) -> Result<u64>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let start = out.len();
    let len = collect(chain, true, out)?;
    if len < hdr_len as u64 {
        out.truncate(start);
        return Err(Error::ChainTooShort { head, len, hdr_len });
    }
    Ok(len)
}

/// The `len` bytes at `addr` as one slice, when they lie inside one region of plain guest
/// memory (no IOMMU): the common case, without the general slice iterator's cost.
fn region_slice<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, MS<'_, M::PhysicalMemory>>> {
    let (region, offset) = mem.physical_memory()?.to_region_addr(addr)?;
    let end = offset.0.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region.get_slice(offset, len).ok()
}

/// Appends `iovec`s covering `segs` in the host mapping of `mem` to `out`. Fails (leaving
/// `out` as it was) when a buffer no longer maps, or when more than [`MAX_BUFFERS`] would be
/// needed.
pub fn to_iovecs<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    writable: bool,
    out: &mut Vec<libc::iovec>,
) -> Result<()> {
    let start = out.len();
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for (index, seg) in segs.iter().enumerate() {
        if let Some(slice) = region_slice(mem, seg.addr, seg.len as usize) {
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            continue;
        }
        let bad = || Error::OutOfGuestMemory {
            index,
            addr: seg.addr.0,
            len: seg.len,
        };
        let slices = match mem.get_slices(seg.addr, seg.len as usize, access) {
            Ok(s) => s,
            Err(_) => {
                out.truncate(start);
                return Err(bad());
            }
        };
        for slice in slices {
            let Ok(slice) = slice else {
                out.truncate(start);
                return Err(bad());
            };
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    if out.len() - start > MAX_BUFFERS {
        out.truncate(start);
        return Err(Error::TooManyBuffers {
            head: 0,
            max: MAX_BUFFERS,
        });
    }
    Ok(())
}

/// Writes `data` at byte `offset` of the buffer sequence `segs` (it may straddle buffers).
/// Returns false when the sequence is too short or memory is not writable.
pub fn write_at<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    data: &[u8],
) -> bool {
    let mut skip = offset;
    let mut data = data;
    for seg in segs {
        if data.is_empty() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = usize::try_from((len - skip).min(data.len() as u64)).unwrap_or(data.len());
        let Some(addr) = seg.addr.0.checked_add(skip).map(GuestAddress) else {
            return false;
        };
        let written = match region_slice(mem, addr, n) {
            Some(slice) => {
                // The slice is exactly `n` bytes long.
                slice.copy_from(&data[..n]);
                true
            }
            None => mem.write_slice(&data[..n], addr).is_ok(),
        };
        if !written {
            return false;
        }
        data = &data[n..];
        skip = 0;
    }
    data.is_empty()
}

/// Reads `buf.len()` bytes at byte `offset` of the buffer sequence `segs`. Returns false when
/// the sequence is too short or memory is not readable.
pub fn read_at<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> bool {
    let mut skip = offset;
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = usize::try_from(len - skip)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let Some(addr) = seg.addr.0.checked_add(skip).map(GuestAddress) else {
            return false;
        };
        let read = match region_slice(mem, addr, n) {
            Some(slice) => slice.copy_to(&mut buf[done..done + n]) == n,
            None => mem.read_slice(&mut buf[done..done + n], addr).is_ok(),
        };
        if !read {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;
    const MEM_SIZE: u64 = 0x10_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const HDR: usize = 12;

    fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A chain of (addr, len, flags) linked in order.
    fn linked(descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i + 1 == descs.len();
                if last {
                    d(a, l, f, 0)
                } else {
                    d(a, l, f | NEXT, i as u16 + 1)
                }
            })
            .collect()
    }

    fn with_chain<R>(
        mem: &Mem,
        descs: &[RawDescriptor],
        f: impl FnOnce(DescriptorChain<&Mem>) -> R,
    ) -> R {
        let q = MockSplitQueue::new(mem, 16);
        q.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        f(chain)
    }

    #[test]
    fn tx_chain_with_header_split_from_frame() {
        let mem = memory();
        let descs = linked(&[(0x2000, 12, 0), (0x3000, 1500, 0)]);
        let mut segs = Vec::new();
        let len = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut segs)).unwrap();
        assert_eq!(len, 1512);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1].addr, GuestAddress(0x3000));
        let mut iov = Vec::new();
        to_iovecs(&mem, &segs, false, &mut iov).unwrap();
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len + iov[1].iov_len, 1512);
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let mem = memory();
        let descs = linked(&[(0x2000, 0, 0), (0x3000, 100, 0), (0x9999_9999, 0, 0)]);
        let mut segs = Vec::new();
        let len = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut segs)).unwrap();
        assert_eq!(len, 100);
        assert_eq!(segs.len(), 1);
    }

    #[test]
    fn tx_buffer_outside_guest_memory_is_rejected() {
        let mem = memory();
        let descs = linked(&[(0x2000, 12, 0), (MEM_SIZE - 10, 100, 0)]);
        let mut segs = vec![Segment {
            addr: GuestAddress(0),
            len: 1,
        }];
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut segs)).unwrap_err();
        assert!(
            matches!(err, Error::OutOfGuestMemory { index: 1, .. }),
            "{err}"
        );
        assert_eq!(segs.len(), 1, "earlier contents are kept, nothing added");
        let descs = linked(&[(u64::MAX - 4, 64, 0)]);
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut segs)).unwrap_err();
        assert!(matches!(err, Error::OutOfGuestMemory { .. }), "{err}");
    }

    #[test]
    fn writable_buffer_in_tx_chain_is_rejected() {
        let mem = memory();
        let descs = linked(&[(0x2000, 12, 0), (0x3000, 100, W)]);
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(
            matches!(err, Error::WrongDirection { head: 0, index: 1 }),
            "{err}"
        );
    }

    #[test]
    fn readable_buffer_in_rx_chain_is_rejected() {
        let mem = memory();
        let descs = linked(&[(0x2000, 100, W), (0x3000, 100, 0)]);
        let err = with_chain(&mem, &descs, |c| parse_rx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, Error::WrongDirection { .. }), "{err}");
    }

    #[test]
    fn looping_chain_is_broken() {
        let mem = memory();
        // 0 -> 1 -> 0 -> ...
        let descs = [d(0x2000, 100, NEXT, 1), d(0x3000, 100, NEXT, 0)];
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, Error::BrokenChain { head: 0 }), "{err}");
        let descs = [d(0x2000, 100, W | NEXT, 0)];
        let err = with_chain(&mem, &descs, |c| parse_rx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, Error::BrokenChain { head: 0 }), "{err}");
    }

    #[test]
    fn next_index_past_the_queue_is_broken() {
        let mem = memory();
        let descs = [d(0x2000, 100, NEXT, 500)];
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, Error::BrokenChain { .. }), "{err}");
    }

    #[test]
    fn chains_shorter_than_the_header_are_rejected() {
        let mem = memory();
        let descs = linked(&[(0x2000, 4, W), (0x3000, 7, W)]);
        let err = with_chain(&mem, &descs, |c| parse_rx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ChainTooShort {
                    len: 11,
                    hdr_len: 12,
                    ..
                }
            ),
            "{err}"
        );
        let descs = linked(&[(0x2000, 10, 0)]);
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, Error::ChainTooShort { .. }), "{err}");
        // The legacy 10-byte header fits.
        let mut segs = Vec::new();
        assert_eq!(
            with_chain(&mem, &descs, |c| parse_tx(c, 10, &mut segs)).unwrap(),
            10
        );
    }

    #[test]
    fn oversized_tx_frame_is_rejected() {
        let mem = memory();
        let max = HDR as u64 + MAX_FRAME_LEN;
        let descs = linked(&[(0x1_0000, max as u32, 0)]);
        assert_eq!(
            with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap(),
            max
        );
        let descs = linked(&[(0x1_0000, max as u32, 0), (0x2000, 1, 0)]);
        let err = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new())).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLong { len, .. } if len == max + 1),
            "{err}"
        );
        // Lengths that would overflow a u32 sum.
        let descs = linked(&[(0x1_0000, u32::MAX, 0), (0x2000, u32::MAX, 0)]);
        let res = with_chain(&mem, &descs, |c| parse_tx(c, HDR, &mut Vec::new()));
        assert!(res.is_err());
    }

    #[test]
    fn too_many_buffers_are_rejected() {
        let mem = memory();
        // A queue of 2048 entries, each a 1-byte readable buffer, all chained.
        let n = MAX_BUFFERS + 1;
        let descs: Vec<_> = (0..n)
            .map(|i| (0x2000 + i as u64, 1u32, 0u16))
            .collect::<Vec<_>>();
        let descs = linked(&descs);
        let q = MockSplitQueue::new(&mem, 2048);
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let err = parse_tx(chain, HDR, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::TooManyBuffers { .. }), "{err}");
        assert_eq!(queue.next_avail(), 1);
    }

    #[test]
    fn rx_chain_capacity_and_num_buffers_straddling_buffers() {
        let mem = memory();
        let descs = linked(&[(0x2000, 11, W), (0x3000, 2000, W)]);
        let mut segs = Vec::new();
        let cap = with_chain(&mem, &descs, |c| parse_rx(c, HDR, &mut segs)).unwrap();
        assert_eq!(cap, 2011);
        // num_buffers at offset 10: one byte in each buffer.
        assert!(write_at(&mem, &segs, 10, &3u16.to_le_bytes()));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000 + 10)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
        let mut back = [0u8; 2];
        assert!(read_at(&mem, &segs, 10, &mut back));
        assert_eq!(u16::from_le_bytes(back), 3);
        assert!(!write_at(&mem, &segs, 2010, &[1, 2]));
        assert!(!read_at(&mem, &segs, 3000, &mut back));
    }
}
