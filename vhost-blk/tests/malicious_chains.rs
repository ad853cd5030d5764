//! The request parser and executor against hand-built, mostly hostile descriptor chains
//! (virtio-queue's `MockSplitQueue` plays the driver). Nothing may panic; every bad chain
//! either gets IOERR/UNSUPP in its status byte or is dropped when it has no usable one.

use std::sync::Arc;

use cowbird_tests::vring::{preset_status, STATUS_CANARY};
use qcow2::{FileStorage, RawImage};
use vhost_blk::disk::Disk;
use vhost_blk::exec::{Completion, Executor};
use vhost_blk::request::{self, Limits, Range, RequestKind, Segment};
use vhost_blk::Error;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
const HDR: u64 = 0x2000;
const STATUS: u64 = 0x3000;
const DATA: u64 = 0x4000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn limits(read_only: bool) -> Limits {
    Limits {
        capacity: 2048,
        read_only,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn dn(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn put_header(mem: &Mem, addr: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
    preset_status(mem, STATUS, 1);
}

/// A chain of `descs` linked in order (NEXT flags and indices set for you).
fn chain<'a>(mem: &'a Mem, descs: &[RawDescriptor]) -> DescriptorChain<&'a Mem> {
    let linked: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &raw)| {
            let s = SplitDescriptor::from(raw);
            let last = i + 1 == descs.len();
            let flags = if last {
                s.flags() & !NEXT
            } else {
                s.flags() | NEXT
            };
            dn(
                s.addr().0,
                s.len(),
                flags,
                if last { 0 } else { i as u16 + 1 },
            )
        })
        .collect();
    raw_chain(mem, &linked)
}

/// A chain of `descs` exactly as given (flags and next indices untouched), head 0.
fn raw_chain<'a>(mem: &'a Mem, descs: &[RawDescriptor]) -> DescriptorChain<&'a Mem> {
    let q = MockSplitQueue::new(mem, QUEUE_SIZE);
    q.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    queue.iter(mem).unwrap().next().unwrap()
}

fn parse_err(c: DescriptorChain<&Mem>, l: &Limits) -> request::Rejected {
    match request::parse(c, l) {
        Ok(r) => panic!("accepted {r:?}"),
        Err(e) => e,
    }
}

fn disk(read_only: bool) -> Disk {
    disk_on(tempfile::tempfile().unwrap(), read_only)
}

/// A disk on `file` (made 1 MiB long).
fn disk_on(file: std::fs::File, read_only: bool) -> Disk {
    file.set_len(2048 * 512).unwrap();
    let img = RawImage::new(Arc::new(FileStorage::new(file)), read_only).unwrap();
    Disk::new(Arc::new(img), Some("serial-42"), 4096).unwrap()
}

fn complete(_mem: &Mem, c: DescriptorChain<&Mem>, disk: &Disk) -> Completion {
    let l = Limits {
        read_only: disk.read_only(),
        ..limits(false)
    };
    Executor::new().complete_chain(c, disk, &l, false)
}

fn status(mem: &Mem) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn valid_read_parses() {
    let mem = memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)]);
    let r = request::parse(c, &limits(false)).unwrap();
    assert_eq!(r.kind, RequestKind::In);
    assert_eq!(r.sector, 8);
    assert_eq!(
        r.data,
        vec![Segment {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(r.status, GuestAddress(STATUS));
}

#[test]
fn any_layout_header_split_and_status_inside_data() {
    let mem = memory();
    // A read with the header split 10 + 6 over two descriptors and the status as the last
    // byte of the data descriptor.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let c = chain(&mem, &[d(HDR, 10, 0), d(HDR + 10, 6, 0), d(DATA, 513, W)]);
    let r = request::parse(c, &limits(false)).unwrap();
    assert_eq!(r.kind, RequestKind::In);
    assert_eq!(r.sector, 2);
    assert_eq!(r.data_len(), 512);
    assert_eq!(r.status, GuestAddress(DATA + 512));
    // A write with the header and the data in one descriptor.
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    let c = chain(&mem, &[d(HDR, 16 + 1024, 0), d(STATUS, 1, W)]);
    let r = request::parse(c, &limits(false)).unwrap();
    assert_eq!((r.data_len(), r.sector), (1024, 3));
    assert_eq!(r.data[0].addr, GuestAddress(HDR + 16));
}

#[test]
fn descriptors_outside_guest_memory_fail_with_ioerr() {
    let mem = memory();
    for (addr, len) in [
        (0x2000_0000, 512),    // beyond the only region
        (MEM_SIZE - 100, 512), // straddles the end
        (u64::MAX - 10, 512),  // wraps around
    ] {
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let c = chain(&mem, &[d(HDR, 16, 0), d(addr, len, W), d(STATUS, 1, W)]);
        let done = complete(&mem, c.clone(), &disk(false));
        assert_eq!(done.status, Some(IOERR), "{addr:#x}");
        assert_eq!(status(&mem), IOERR);
        let e = parse_err(c, &limits(false));
        assert!(
            matches!(e.error, Error::OutOfGuestMemory { .. }),
            "{:?}",
            e.error
        );
    }
    // An out-of-memory header fails the same way.
    let c = chain(&mem, &[d(0x4000_0000, 16, 0), d(STATUS, 1, W)]);
    assert!(matches!(
        parse_err(c, &limits(false)).error,
        Error::OutOfGuestMemory { .. }
    ));
}

#[test]
fn status_outside_guest_memory_drops_the_request() {
    let mem = memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(MEM_SIZE + 0x1000, 1, W)]);
    let done = complete(&mem, c.clone(), &disk(false));
    assert_eq!(done.status, None);
    assert_eq!(done.used_len, 0);
    assert!(parse_err(c, &limits(false)).status.is_none());
}

#[test]
fn looping_and_overlong_chains_are_dropped() {
    let mem = memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<Vec<RawDescriptor>> = vec![
        // 0 -> 1 -> 0 -> ...
        vec![dn(HDR, 16, NEXT, 1), dn(STATUS, 1, W | NEXT, 0)],
        // a descriptor pointing at itself
        vec![dn(HDR, 16, NEXT, 0)],
        // next index past the queue
        vec![dn(HDR, 16, NEXT, 200), d(STATUS, 1, W)],
    ];
    for descs in cases {
        let c = raw_chain(&mem, &descs);
        let done = complete(&mem, c.clone(), &disk(false));
        assert_eq!(done.status, None);
        assert_eq!(status(&mem), STATUS_CANARY);
        let e = parse_err(c, &limits(false));
        assert!(
            matches!(e.error, Error::BrokenChain { .. }),
            "{:?}",
            e.error
        );
    }
}

#[test]
fn wrong_directions_are_rejected() {
    let mem = memory();
    // Header in a device-writable buffer: no readable header, IOERR into the status.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let c = chain(&mem, &[d(HDR, 16, W), d(STATUS, 1, W)]);
    let e = parse_err(c.clone(), &limits(false));
    assert!(
        matches!(e.error, Error::ShortHeader { len: 0 }),
        "{:?}",
        e.error
    );
    assert_eq!(complete(&mem, c, &disk(false)).status, Some(IOERR));

    // Status in a device-readable buffer: nothing may be written, the request is dropped.
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(STATUS, 1, 0)]);
    let e = parse_err(c, &limits(false));
    assert!(matches!(e.error, Error::NoStatus { .. }) && e.status.is_none());
    assert_eq!(status(&mem), STATUS_CANARY);

    // Readable after writable.
    let c = chain(
        &mem,
        &[
            d(HDR, 16, 0),
            d(DATA, 512, W),
            d(DATA + 512, 512, 0),
            d(STATUS, 1, W),
        ],
    );
    let e = parse_err(c, &limits(false));
    assert!(
        matches!(e.error, Error::ReadableAfterWritable { index: 2 }),
        "{:?}",
        e.error
    );

    // A read whose data buffer is device-readable.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]);
    let e = parse_err(c, &limits(false));
    assert!(
        matches!(e.error, Error::WrongDirection { len: 512, .. }),
        "{:?}",
        e.error
    );

    // A write whose data buffer is device-writable: the disk must not be written.
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]);
    let e = parse_err(c.clone(), &limits(false));
    assert!(
        matches!(e.error, Error::WrongDirection { len: 512, .. }),
        "{:?}",
        e.error
    );
    assert_eq!(complete(&mem, c, &disk(false)).status, Some(IOERR));
}

#[test]
fn short_header_and_short_status() {
    let mem = memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let c = chain(&mem, &[d(HDR, 8, 0), d(STATUS, 1, W)]);
    let e = parse_err(c, &limits(false));
    assert!(matches!(e.error, Error::ShortHeader { len: 8 }));
    assert_eq!(e.status, Some(GuestAddress(STATUS)));

    // A zero-length status descriptor: the status becomes the last data byte, leaving 511
    // data bytes, which is not a whole sector.
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 0, W)]);
    let e = parse_err(c, &limits(false));
    assert!(
        matches!(e.error, Error::UnalignedLength { len: 511, .. }),
        "{:?}",
        e.error
    );
    assert_eq!(e.status, Some(GuestAddress(DATA + 511)));

    // Only a zero-length writable descriptor: no status at all.
    let c = chain(&mem, &[d(HDR, 16, 0), d(STATUS, 0, W)]);
    let e = parse_err(c, &limits(false));
    assert!(e.status.is_none());

    // An empty chain (single zero-length descriptor).
    let c = chain(&mem, &[d(HDR, 0, 0)]);
    assert!(parse_err(c, &limits(false)).status.is_none());
}

#[test]
fn requests_past_the_end_of_the_disk_fail() {
    let mem = memory();
    for (sector, len) in [
        (2047, 1024),
        (2048, 512),
        (u64::MAX, 512),
        (u64::MAX / 512, 4096),
    ] {
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            put_header(&mem, HDR, t, sector);
            let dir = if t == VIRTIO_BLK_T_IN { W } else { 0 };
            let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, len, dir), d(STATUS, 1, W)]);
            let e = parse_err(c.clone(), &limits(false));
            assert!(matches!(e.error, Error::OutOfRange { .. }), "{:?}", e.error);
            assert_eq!(complete(&mem, c, &disk(false)).status, Some(IOERR));
        }
    }
    // The last sector itself is fine, and so is a zero-length read at the very end.
    for (sector, len) in [(2047u64, 512u32), (2048, 0)] {
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
        let descs: &[RawDescriptor] = if len > 0 {
            &[d(HDR, 16, 0), d(DATA, len, W), d(STATUS, 1, W)]
        } else {
            &[d(HDR, 16, 0), d(STATUS, 1, W)]
        };
        let r = request::parse(chain(&mem, descs), &limits(false)).unwrap();
        assert_eq!(
            (r.kind.clone(), r.sector, r.data_len()),
            (RequestKind::In, sector, u64::from(len))
        );
    }
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = memory();
    for t in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_REPORT,
        99,
        VIRTIO_BLK_T_BARRIER | VIRTIO_BLK_T_OUT,
    ] {
        put_header(&mem, HDR, t, 0);
        let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]);
        let done = complete(&mem, c, &disk(false));
        assert_eq!(done.status, Some(UNSUPP), "type {t}");
        assert_eq!(status(&mem), UNSUPP);
    }
}

#[test]
fn read_only_refuses_every_write_kind() {
    let mem = memory();
    let file = tempfile::tempfile().unwrap();
    let pattern = vec![0x5au8; 2048 * 512];
    std::os::unix::fs::FileExt::write_all_at(&file, &pattern, 0).unwrap();
    let ro = disk_on(file.try_clone().unwrap(), true);
    // A non-zero write, then a discard and a write-zeroes of the first 8 sectors.
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0xeeu8; 512], GuestAddress(DATA)).unwrap();
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]);
    assert_eq!(complete(&mem, c, &ro).status, Some(IOERR), "write");
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, t, 0);
        let len = put_ranges(&mem, &[(0, 8, 0)]);
        let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)]);
        assert_eq!(complete(&mem, c, &ro).status, Some(IOERR), "type {t}");
    }
    let mut after = vec![0u8; pattern.len()];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut after, 0).unwrap();
    assert!(after == pattern, "a refused request changed the disk");
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(STATUS, 1, W)]);
    assert_eq!(complete(&mem, c, &ro).status, Some(OK));
}

fn put_ranges(mem: &Mem, ranges: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, n, flags)) in ranges.iter().enumerate() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&b, GuestAddress(DATA + 16 * i as u64))
            .unwrap();
    }
    16 * ranges.len() as u32
}

#[test]
fn discard_and_write_zeroes_payloads_are_validated() {
    let mem = memory();
    let l = limits(false);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let run = |t: u32, ranges: &[(u64, u32, u32)]| {
        put_header(&mem, HDR, t, 0);
        let len = put_ranges(&mem, ranges);
        let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)]);
        request::parse(c, &l)
    };
    let r = run(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (100, 16, 0)]).unwrap();
    assert_eq!(
        r.kind,
        RequestKind::Discard(vec![
            Range {
                sector: 0,
                sectors: 8,
                unmap: false
            },
            Range {
                sector: 100,
                sectors: 16,
                unmap: false
            }
        ])
    );
    let r = run(VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 8, unmap)]).unwrap();
    assert_eq!(
        r.kind,
        RequestKind::WriteZeroes(vec![Range {
            sector: 8,
            sectors: 8,
            unmap: true
        }])
    );

    let status_of = |res: Result<_, request::Rejected>| match res {
        Ok(r) => panic!("accepted {r:?}"),
        Err(e) => e.error.status(),
    };
    // The unmap flag is not allowed on discard; reserved flags on neither.
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_DISCARD, &[(0, 8, unmap)])),
        UNSUPP
    );
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)])),
        UNSUPP
    );
    // An unknown flag in any segment wins over a range error in an earlier one (5.2.6.2).
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_DISCARD, &[(2040, 16, 0), (0, 8, 4)])),
        UNSUPP
    );
    // More segments than advertised.
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0); 5])),
        UNSUPP
    );
    // A segment larger than advertised, or past the end.
    assert_eq!(status_of(run(VIRTIO_BLK_T_DISCARD, &[(0, 1025, 0)])), IOERR);
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_WRITE_ZEROES, &[(2040, 16, 0)])),
        IOERR
    );
    assert_eq!(
        status_of(run(VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX, 1, 0)])),
        IOERR
    );
    // A payload that is not whole segments, or none.
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, 15, 0), d(STATUS, 1, W)]);
    assert!(matches!(
        parse_err(c, &l).error,
        Error::BadSegmentPayload { len: 15 }
    ));
    let c = chain(&mem, &[d(HDR, 16, 0), d(STATUS, 1, W)]);
    assert!(matches!(
        parse_err(c, &l).error,
        Error::BadSegmentPayload { len: 0 }
    ));
}

/// Writes an indirect table of `descs` at `addr`.
fn put_table(mem: &Mem, addr: u64, descs: &[RawDescriptor]) {
    for (i, desc) in descs.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(addr + 16 * i as u64))
            .unwrap();
    }
}

#[test]
fn indirect_tables() {
    let mem = memory();
    let table = 0x8000;
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    put_table(
        &mem,
        table,
        &[
            dn(HDR, 16, NEXT, 1),
            dn(DATA, 1024, W | NEXT, 2),
            d(STATUS, 1, W),
        ],
    );
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let r = request::parse(raw_chain(&mem, &[d(table, 48, indirect)]), &limits(false)).unwrap();
    assert_eq!((r.data_len(), r.kind, r.sector), (1024, RequestKind::In, 4));

    // A table outside guest memory, a table length that is not whole descriptors, and an
    // indirect descriptor inside an indirect table: all dropped.
    for head in [
        d(0x5000_0000, 48, indirect),
        d(table, 47, indirect),
        d(table + 0x100, 16, indirect),
    ] {
        put_table(&mem, table + 0x100, &[d(table, 48, indirect)]);
        let c = raw_chain(&mem, &[head]);
        let done = complete(&mem, c, &disk(false));
        assert_eq!(done.status, None);
    }
    // An indirect table that loops.
    put_table(
        &mem,
        table,
        &[dn(HDR, 16, NEXT, 1), dn(STATUS, 1, W | NEXT, 0)],
    );
    let e = parse_err(raw_chain(&mem, &[d(table, 32, indirect)]), &limits(false));
    assert!(
        matches!(e.error, Error::BrokenChain { .. }),
        "{:?}",
        e.error
    );
}

#[test]
fn executor_reads_writes_zeroes_and_identifies() {
    let mem = memory();
    let disk = disk(false);
    let data: Vec<u8> = (0..3072u32).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // Write 3 sectors at sector 10, gathered from three descriptors of odd sizes.
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
    let c = chain(
        &mem,
        &[
            d(HDR, 16, 0),
            d(DATA, 1000, 0),
            d(DATA + 1000, 72, 0),
            d(DATA + 1072, 2000, 0),
            d(STATUS, 1, W),
        ],
    );
    let done = complete(&mem, c, &disk);
    assert_eq!((done.status, done.used_len), (Some(OK), 1));
    // Read them back scattered differently.
    let out = 0x20000;
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 10);
    // The status byte follows the data in the last descriptor.
    preset_status(&mem, out + 3072, 1);
    let c = chain(
        &mem,
        &[d(HDR, 16, 0), d(out, 3000, W), d(out + 3000, 72 + 1, W)],
    );
    let done = complete(&mem, c, &disk);
    assert_eq!((done.status, done.used_len), (Some(OK), 3073));
    let mut back = vec![0u8; 3072];
    mem.read_slice(&mut back, GuestAddress(out)).unwrap();
    assert_eq!(back, data);
    let status_at: u8 = mem.read_obj(GuestAddress(out + 3072)).unwrap();
    assert_eq!(status_at, OK);

    // Write-zeroes the middle sector.
    put_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = put_ranges(&mem, &[(11, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    let c = chain(&mem, &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)]);
    assert_eq!(complete(&mem, c, &disk).status, Some(OK));
    let mut sector = vec![1u8; 512];
    disk.image().read_at(&mut sector, 11 * 512).unwrap();
    assert_eq!(sector, vec![0u8; 512]);

    // GET_ID with a larger and a smaller buffer.
    for (len, expect) in [(64u32, 20u32), (4, 4)] {
        put_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xffu8; 64], GuestAddress(out)).unwrap();
        let c = chain(&mem, &[d(HDR, 16, 0), d(out, len, W), d(STATUS, 1, W)]);
        let done = complete(&mem, c, &disk);
        assert_eq!((done.status, done.used_len), (Some(OK), expect + 1));
        let mut id = vec![0u8; 20];
        mem.read_slice(&mut id, GuestAddress(out)).unwrap();
        let want: &[u8] = b"serial-42\0\0\0\0\0\0\0\0\0\0\0";
        assert_eq!(&id[..expect as usize], &want[..expect as usize]);
    }
}

/// A small deterministic generator for the fuzz loop.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_chains_never_panic() {
    let mem = memory();
    let disk = disk(false);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut exec = Executor::new();
    let l = limits(false);
    let interesting_addrs = [
        HDR,
        DATA,
        STATUS,
        0,
        MEM_SIZE - 1,
        MEM_SIZE,
        u64::MAX,
        0x8000,
    ];
    let interesting_lens = [0u32, 1, 15, 16, 17, 512, 513, 4096, u32::MAX, 0x10_0000];
    for _ in 0..5000 {
        let t = [0, 1, 4, 8, 11, 13, 2, rng.next() as u32][rng.below(8) as usize];
        put_header(&mem, HDR, t, rng.below(4096));
        put_ranges(
            &mem,
            &[(rng.below(4096), rng.next() as u32, rng.next() as u32)],
        );
        // Random indirect table contents at 0x8000.
        let table: Vec<RawDescriptor> = (0..4)
            .map(|_| {
                let addr = interesting_addrs[rng.below(8) as usize].wrapping_add(rng.below(4));
                let len = interesting_lens[rng.below(10) as usize];
                dn(addr, len, rng.below(8) as u16, rng.below(6) as u16)
            })
            .collect();
        put_table(&mem, 0x8000, &table);
        let n = 1 + rng.below(6) as usize;
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|_| {
                let addr = interesting_addrs[rng.below(8) as usize].wrapping_add(rng.below(4));
                let len = interesting_lens[rng.below(10) as usize];
                dn(
                    addr,
                    len,
                    rng.below(8) as u16,
                    rng.below(QUEUE_SIZE as u64 + 2) as u16,
                )
            })
            .collect();
        let c = raw_chain(&mem, &descs);
        let done = exec.complete_chain(c, &disk, &l, rng.below(2) == 0);
        if done.status.is_none() {
            assert_eq!(done.used_len, 0);
        }
    }
}
