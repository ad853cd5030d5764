//! The body of the `cargo fuzz` target in `vhost-blk/fuzz`: guest memory and one queue's ring
//! addresses, all chosen by the fuzzer, served by the backend's queue worker as after a kick
//! (chain parsing, the io_uring zero-copy path, the bounce-buffer path, completions and
//! notification). Kept in the library so that the corpus also runs as an ordinary test
//! (`tests/fuzz_corpus.rs`) on stable Rust.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::device::Device;
use crate::disk::{Disk, DiskOptions};

/// Bytes of guest memory; the input after its control bytes fills it from address 0.
pub const GUEST_BYTES: usize = 64 << 10;
/// Control bytes at the start of an input: flags (bit 0 EVENT_IDX, bit 1 the qcow2 disk
/// instead of the raw one, bit 2 guest memory in two regions), the descriptor table, avail
/// and used ring addresses (little-endian u16 each) and the queue size (1 << (byte % 5)).
pub const CONTROL_BYTES: usize = 8;
/// The devices' largest queue.
const MAX_QUEUE_SIZE: u16 = 16;
/// Virtual size of the fuzzed disks.
const DISK_BYTES: u64 = 1 << 20;

/// Serves the chains an input makes available; returns the guest memory afterwards (`None`
/// when the input is too short or the ring addresses are refused). Any outcome is fine but a
/// panic, a hang, or an access outside guest memory.
pub fn serve_input(data: &[u8]) -> Option<GuestMemoryMmap> {
    let (control, memory) = data.split_first_chunk::<CONTROL_BYTES>()?;
    // One input at a time: the devices' queue slots serve one connection at a time.
    static SERVING: Mutex<()> = Mutex::new(());
    let _serving = SERVING.lock().unwrap_or_else(|p| p.into_inner());
    let flags = control[0];
    let device = if flags & 2 == 0 {
        device(&RAW, qcow2::Format::Raw)
    } else {
        device(&QCOW2, qcow2::Format::Qcow2)
    };
    let half = GUEST_BYTES / 2;
    let ranges = if flags & 4 == 0 {
        vec![(GuestAddress(0), GUEST_BYTES)]
    } else {
        vec![(GuestAddress(0), half), (GuestAddress(half as u64), half)]
    };
    let guest = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let n = memory.len().min(GUEST_BYTES);
    guest
        .write_slice(&memory[..n], GuestAddress(0))
        .expect("inside guest memory");
    let mem = GuestMemoryAtomic::new(guest.clone());
    let backend = BlkBackend::new(device.clone(), mem.clone());
    let vring = VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE).expect("vring");
    let addr = |i: usize| u64::from(u16::from_le_bytes([control[i], control[i + 1]]));
    vring.set_queue_size(1 << (control[7] % 5));
    vring
        .set_queue_info(addr(1) & !15, addr(3) & !1, addr(5) & !3)
        .ok()?;
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let event_idx = flags & 1 != 0;
    vring.set_queue_event_idx(event_idx);
    backend.set_event_idx(event_idx);
    let _ = backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0);
    backend.deactivate();
    Some(guest)
}

static RAW: OnceLock<Arc<Device>> = OnceLock::new();
static QCOW2: OnceLock<Arc<Device>> = OnceLock::new();

/// The one-queue device on a fresh image of `format`, made on first use and shared by the
/// inputs that follow (their writes accumulate, as a guest's do).
fn device(cell: &'static OnceLock<Arc<Device>>, format: qcow2::Format) -> &'static Arc<Device> {
    cell.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "vhost-blk-fuzz-{}-{}",
            std::process::id(),
            format.name()
        ));
        make_image(&path, format);
        let disk = Disk::open(&DiskOptions {
            path: path.clone(),
            format: Some(format),
            serial: Some("fuzz".into()),
            ..Default::default()
        })
        .expect("open the fuzzed disk");
        let _ = std::fs::remove_file(&path);
        Arc::new(Device::new(disk, 1, MAX_QUEUE_SIZE).expect("device"))
    })
}

/// A new image at `path`: raw, or qcow2 with 4 KiB clusters (many tables per MiB).
fn make_image(path: &Path, format: qcow2::Format) {
    match format {
        qcow2::Format::Raw => std::fs::File::create(path)
            .and_then(|f| f.set_len(DISK_BYTES))
            .expect("create the raw image"),
        qcow2::Format::Qcow2 => qcow2::create::create(
            path,
            &qcow2::create::CreateOptions {
                size: DISK_BYTES,
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .expect("create the qcow2 image"),
    }
}
