//! Whether a driver wants to hear of the used buffers a backend just added.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks not to be notified (without EVENT_IDX).
const NO_INTERRUPT: u16 = 1;

/// Whether the driver is to be notified of the used entries added since the last call:
/// with EVENT_IDX, `virtio-queue`'s check of `used_event` (which also resets its count);
/// without it, unless the available ring's flags hold NO_INTERRUPT (virtio 1.2 §2.7.10; QEMU
/// honours it too), which `virtio-queue` ignores.
pub fn needs_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    let wanted = queue.needs_notification(mem)?;
    if !wanted || queue.event_idx_enabled() {
        return Ok(wanted);
    }
    // The used index is published before the flag is read (the driver clears the flag,
    // then rereads the used index: one of the two sees the other).
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Relaxed)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & NO_INTERRUPT == 0)
}
