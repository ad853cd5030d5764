//! Parsing virtio-blk requests out of untrusted descriptor chains.
//!
//! A request is a 16-byte header and any payload in device-readable buffers, followed by data
//! and a one-byte status in device-writable buffers. With VIRTIO_F_VERSION_1 the framing is
//! free: the header may span descriptors and the status is simply the last writable byte.
//! Everything here is validated before the request reaches the disk: every buffer must lie in
//! guest memory with the right direction, lengths must be whole sectors, ranges must lie inside
//! the disk. A rejected chain still gets a status byte when it has a usable one.

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::error::{Error, Result};
use crate::guest;

/// log2 of the virtio-blk sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector size: offsets and capacities are counted in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u64 = 16;
/// Length of one discard/write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_LEN: u64 = 16;

/// A guest buffer that lies entirely inside guest memory (checked by [`parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// Write-zeroes only: the device may deallocate the range.
    pub unmap: bool,
}

impl Range {
    /// First byte of the range.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.sectors) << SECTOR_SHIFT
    }

    /// Whether the range covers no sector.
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers (VIRTIO_BLK_T_IN).
    In,
    /// Write the data buffers to sectors (VIRTIO_BLK_T_OUT).
    Out,
    /// Make completed writes durable (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Return the device serial in the data buffers (VIRTIO_BLK_T_GET_ID).
    GetId,
    /// Deallocate ranges (VIRTIO_BLK_T_DISCARD).
    Discard(Vec<Range>),
    /// Make ranges read as zeros (VIRTIO_BLK_T_WRITE_ZEROES).
    WriteZeroes(Vec<Range>),
}

impl RequestKind {
    /// Whether the request changes the image or its durability (everything but reads and
    /// GET_ID): the slow path runs such a request only once the queue's io_uring requests
    /// have finished, since their clusters may be the ones it waits for.
    pub fn changes_the_image(&self) -> bool {
        !matches!(self, RequestKind::In | RequestKind::GetId)
    }

    /// The virtio request type number.
    pub fn type_code(&self) -> u32 {
        match self {
            RequestKind::In => VIRTIO_BLK_T_IN,
            RequestKind::Out => VIRTIO_BLK_T_OUT,
            RequestKind::Flush => VIRTIO_BLK_T_FLUSH,
            RequestKind::GetId => VIRTIO_BLK_T_GET_ID,
            RequestKind::Discard(_) => VIRTIO_BLK_T_DISCARD,
            RequestKind::WriteZeroes(_) => VIRTIO_BLK_T_WRITE_ZEROES,
        }
    }
}

/// A validated virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// The operation.
    pub kind: RequestKind,
    /// First sector (IN and OUT; zero or ignored otherwise).
    pub sector: u64,
    /// Data buffers: device-writable for IN and GET_ID, device-readable for OUT, empty
    /// otherwise (the discard/write-zeroes payload is already decoded into the kind).
    pub data: Vec<Segment>,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

impl Request {
    /// Total length of the data buffers in bytes.
    pub fn data_len(&self) -> u64 {
        total_len(&self.data)
    }

    /// First byte on the disk (IN and OUT).
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
}

/// What the device accepts: the numbers advertised in the config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Largest discard segment in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Largest write-zeroes segment in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

/// A chain that cannot be executed.
#[derive(Debug)]
pub struct Rejected {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Where to write the failure status; `None` when the chain has no usable status byte
    /// (the request is then completed without a status).
    pub status: Option<GuestAddress>,
    /// Why.
    pub error: Error,
}

/// The device-readable and device-writable halves of a chain.
#[derive(Debug, Default)]
struct Buffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

/// Parses and validates the request in `chain`.
///
/// Never panics and never touches memory outside the guest's regions, whatever the chain
/// contains. Reads the header and any discard/write-zeroes payload from guest memory.
pub fn parse<D>(
    chain: DescriptorChain<D>,
    limits: &Limits,
) -> std::result::Result<Request, Rejected>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    let (mut bufs, status) = collect(chain.clone(), mem).map_err(|(status, error)| Rejected {
        head,
        status,
        error,
    })?;
    let reject = |error| Rejected {
        head,
        status: Some(status),
        error,
    };
    parse_buffers(mem, &mut bufs, limits, head, status).map_err(reject)
}

/// Walks the chain, checks every buffer, and splits off the status byte.
fn collect<D>(
    chain: DescriptorChain<D>,
    mem: &D::Target,
) -> std::result::Result<(Buffers, GuestAddress), (Option<GuestAddress>, Error)>
where
    D: Deref,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut bufs = Buffers::default();
    let mut first_error = None;
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut status_valid = false;
    for (index, desc) in chain.enumerate() {
        count += 1;
        last_has_next = desc.has_next();
        let len = desc.len();
        if len == 0 {
            continue;
        }
        let writable = desc.is_write_only();
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let valid = guest::check_range(mem, desc.addr(), len as usize, access);
        if !valid {
            first_error.get_or_insert(Error::OutOfGuestMemory {
                index,
                addr: desc.addr().0,
                len,
            });
        }
        let seg = Segment {
            addr: desc.addr(),
            len,
        };
        if writable {
            status_valid = valid;
            bufs.writable.push(seg);
        } else {
            if !bufs.writable.is_empty() {
                first_error.get_or_insert(Error::ReadableAfterWritable { index });
            }
            bufs.readable.push(seg);
        }
    }
    if count == 0 {
        return Err((None, Error::EmptyChain { head }));
    }
    if last_has_next {
        // The iterator stopped early: a loop, a chain longer than the queue, a next index out of
        // range or an unreadable descriptor. Nothing in it can be trusted as the status byte.
        return Err((None, Error::BrokenChain { head }));
    }
    let Some(last) = bufs.writable.last_mut() else {
        return Err((None, first_error.unwrap_or(Error::NoStatus { head })));
    };
    if !status_valid {
        let error = first_error.unwrap_or(Error::NoStatus { head });
        return Err((None, error));
    }
    // `last.len >= 1` and the whole buffer is in guest memory, so this cannot overflow.
    let status = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        bufs.writable.pop();
    }
    match first_error {
        Some(error) => Err((Some(status), error)),
        None => Ok((bufs, status)),
    }
}

/// Decodes the header and builds the typed request.
fn parse_buffers<M: GuestMemory + ?Sized>(
    mem: &M,
    bufs: &mut Buffers,
    limits: &Limits,
    head: u16,
    status: GuestAddress,
) -> Result<Request> {
    let readable_len = total_len(&bufs.readable);
    if readable_len < HEADER_LEN {
        return Err(Error::ShortHeader { len: readable_len });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_segments(mem, &bufs.readable, &mut header)?;
    drop_front(&mut bufs.readable, HEADER_LEN);
    let payload = std::mem::take(&mut bufs.readable);
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let in_data = std::mem::take(&mut bufs.writable);
    let no_stray = |segs: &[Segment]| match total_len(segs) {
        0 => Ok(()),
        len => Err(Error::WrongDirection { request_type, len }),
    };
    let writes = matches!(
        request_type,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if writes && limits.read_only {
        return Err(Error::ReadOnly(request_type));
    }
    let (kind, data) = match request_type {
        VIRTIO_BLK_T_IN => {
            no_stray(&payload)?;
            check_io_range(sector, total_len(&in_data), limits.capacity)?;
            (RequestKind::In, in_data)
        }
        VIRTIO_BLK_T_OUT => {
            no_stray(&in_data)?;
            check_io_range(sector, total_len(&payload), limits.capacity)?;
            (RequestKind::Out, payload)
        }
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => {
            no_stray(&payload)?;
            (RequestKind::GetId, in_data)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            no_stray(&in_data)?;
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let ranges = parse_ranges(mem, &payload, limits, discard)?;
            let kind = if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            };
            (kind, Vec::new())
        }
        other => return Err(Error::UnsupportedType(other)),
    };
    Ok(Request {
        head,
        kind,
        sector,
        data,
        status,
    })
}

/// Checks that `len` bytes at `sector` are whole sectors inside the disk.
fn check_io_range(sector: u64, len: u64, capacity: u64) -> Result<()> {
    if len % SECTOR_SIZE != 0 {
        return Err(Error::UnalignedLength { sector, len });
    }
    let sectors = len >> SECTOR_SHIFT;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Error::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Decodes the `virtio_blk_discard_write_zeroes` segments of a discard or write-zeroes request.
fn parse_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    payload: &[Segment],
    limits: &Limits,
    discard: bool,
) -> Result<Vec<Range>> {
    let len = total_len(payload);
    if len == 0 || len % RANGE_LEN != 0 {
        return Err(Error::BadSegmentPayload { len });
    }
    let count = len / RANGE_LEN;
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    if count > u64::from(max_seg) {
        return Err(Error::TooManySegments {
            count,
            max: max_seg,
        });
    }
    // Bounded by max_seg * 16 bytes.
    let mut raw = vec![0u8; len as usize];
    read_segments(mem, payload, &mut raw)?;
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    let fields = |c: &[u8]| {
        let sector = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let sectors = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
        let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
        (sector, sectors, flags)
    };
    // An unknown flag in any segment makes the request UNSUPP (virtio 1.2, 5.2.6.2), whatever
    // is wrong with the segments before it.
    let segments = raw.chunks_exact(RANGE_LEN as usize).map(fields);
    for (sector, _, flags) in segments.clone() {
        if flags & !allowed_flags != 0 {
            return Err(Error::BadSegmentFlags { sector, flags });
        }
    }
    segments
        .map(|(sector, sectors, flags)| {
            if sectors > max_sectors {
                return Err(Error::SegmentTooLarge {
                    sector,
                    sectors,
                    max: max_sectors,
                });
            }
            check_io_range(sector, u64::from(sectors) << SECTOR_SHIFT, limits.capacity)?;
            Ok(Range {
                sector,
                sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

/// Sum of the segment lengths.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Removes the first `n` bytes from `segs` (`n` must not exceed the total length).
fn drop_front(segs: &mut Vec<Segment>, n: u64) {
    let mut left = n;
    let whole = segs
        .iter()
        .take_while(|seg| {
            let len = u64::from(seg.len);
            let inside = left >= len;
            if inside {
                left -= len;
            }
            inside
        })
        .count();
    segs.drain(..whole);
    if left > 0 {
        // 0 < left < seg.len, so the rest fits in u32 and its address is in guest memory.
        let seg = &mut segs[0];
        seg.addr = GuestAddress(seg.addr.0 + left);
        seg.len -= left as u32;
    }
}

/// Fills `buf` from the front of `segs` (which must hold at least `buf.len()` bytes).
fn read_segments<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> Result<()> {
    let mut cursor = SegmentCursor::new(segs);
    cursor.read_from_guest(mem, buf)
}

/// A position in a list of segments, for scatter/gather copies in pieces.
#[derive(Debug)]
pub struct SegmentCursor<'a> {
    segs: &'a [Segment],
    index: usize,
    pos: u32,
}

impl<'a> SegmentCursor<'a> {
    /// A cursor at the start of `segs`.
    pub fn new(segs: &'a [Segment]) -> Self {
        SegmentCursor {
            segs,
            index: 0,
            pos: 0,
        }
    }

    /// The next contiguous piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        let seg = self.segs.get(self.index)?;
        let left = (seg.len - self.pos) as usize;
        let n = left.min(max);
        let addr = GuestAddress(seg.addr.0 + u64::from(self.pos));
        if n == left {
            self.index += 1;
            self.pos = 0;
        } else {
            self.pos += n as u32;
        }
        Some((addr, n))
    }

    /// Copies `buf` into guest memory at the cursor and advances.
    pub fn write_to_guest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        mut buf: &[u8],
    ) -> Result<()> {
        while !buf.is_empty() {
            let (addr, n) = self.next_piece(buf.len()).ok_or(Error::GuestMemory {
                addr: 0,
                source: vm_memory::GuestMemoryError::PartialBuffer {
                    expected: buf.len(),
                    completed: 0,
                },
            })?;
            guest::write(mem, addr, &buf[..n]).map_err(|source| Error::GuestMemory {
                addr: addr.0,
                source,
            })?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Fills `buf` from guest memory at the cursor and advances.
    pub fn read_from_guest<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        mut buf: &mut [u8],
    ) -> Result<()> {
        while !buf.is_empty() {
            let (addr, n) = self.next_piece(buf.len()).ok_or(Error::GuestMemory {
                addr: 0,
                source: vm_memory::GuestMemoryError::PartialBuffer {
                    expected: buf.len(),
                    completed: 0,
                },
            })?;
            guest::read(mem, addr, &mut buf[..n]).map_err(|source| Error::GuestMemory {
                addr: addr.0,
                source,
            })?;
            buf = &mut buf[n..];
        }
        Ok(())
    }
}
