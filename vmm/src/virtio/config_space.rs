//! The device configuration space as the guest sees it.
//!
//! It is read from the backend when the backend connects (and again from each new backend
//! after a reconnect) and served to the guest from here, so a guest read never waits for a
//! backend. The guest may write only the fields its device type makes writable, and only
//! with the feature that makes them so negotiated (virtio-blk: the `writeback` byte with
//! VIRTIO_BLK_F_CONFIG_WCE; virtio-net: nothing), as in QEMU; other writes are dropped
//! instead of reaching a backend that would close the connection over them. What the guest
//! wrote is kept and written again to every new backend, which starts from its defaults,
//! until a device reset puts the backend's defaults back (QEMU restores the original wce).

use super::DeviceType;

/// virtio-blk feature bit: the `writeback` field is writable.
pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
/// Offset of virtio-blk's `num_queues` (u16).
const BLK_NUM_QUEUES: usize = 0x22;
/// Offset of virtio-net's `max_virtqueue_pairs` (u16).
const NET_MAX_PAIRS: usize = 0x08;

/// A field the guest may write: where, how long, and the feature that makes it writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WritableField {
    offset: usize,
    len: usize,
    feature: u64,
}

/// The fields of `kind`'s configuration space the driver may write.
fn writable_fields(kind: DeviceType) -> &'static [WritableField] {
    match kind {
        // `writeback` (wce): 0 = writethrough, 1 = writeback.
        DeviceType::Block => &[WritableField {
            offset: 0x20,
            len: 1,
            feature: VIRTIO_BLK_F_CONFIG_WCE,
        }],
        DeviceType::Net => &[],
    }
}

/// A device's configuration space, cached.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    kind: DeviceType,
    num_queues: u16,
    bytes: Vec<u8>,
    /// Fields the guest wrote, in the order first written.
    written: Vec<WritableField>,
    generation: u8,
}

impl ConfigSpace {
    /// The space of a `kind` device with `num_queues` queues, from the backend's `bytes`.
    pub fn new(kind: DeviceType, num_queues: u16, bytes: &[u8]) -> Self {
        let mut space = Self {
            kind,
            num_queues,
            bytes: Vec::new(),
            written: Vec::new(),
            generation: 0,
        };
        space.bytes = space.guest_view(bytes);
        space
    }

    /// The guest-visible bytes for a backend's `bytes`: the device type's size (short
    /// replies padded with zeros), the queue count the device has rather than the backend's
    /// (a NIC's pairs: its queues without the control queue), and the fields the guest wrote
    /// as it wrote them.
    fn guest_view(&self, bytes: &[u8]) -> Vec<u8> {
        let mut space = bytes.to_vec();
        space.resize(self.kind.config_size(), 0);
        let (offset, count) = match self.kind {
            DeviceType::Block => (BLK_NUM_QUEUES, self.num_queues),
            DeviceType::Net => (NET_MAX_PAIRS, self.num_queues / 2),
        };
        space[offset..offset + 2].copy_from_slice(&count.to_le_bytes());
        for field in &self.written {
            let range = field.offset..field.offset + field.len;
            space[range.clone()].copy_from_slice(&self.bytes[range]);
        }
        space
    }

    /// Guest read of `data.len()` bytes at `offset`; bytes past the space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| self.bytes.get(at)).copied().unwrap_or(0);
        }
    }

    /// The configuration generation: changes whenever the space changes under the driver.
    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// Whether the driver, having negotiated `driver_features`, may write `len` bytes at
    /// `offset`: exactly one writable field of the device type, whose feature it negotiated.
    pub fn is_writable(&self, offset: u64, len: usize, driver_features: u64) -> bool {
        self.field(offset, len)
            .is_some_and(|f| driver_features & f.feature != 0)
    }

    fn field(&self, offset: u64, len: usize) -> Option<WritableField> {
        writable_fields(self.kind)
            .iter()
            .copied()
            .find(|f| f.offset as u64 == offset && f.len == len)
    }

    /// Takes a guest write to a writable field (see [`Self::is_writable`]); anything else is
    /// ignored.
    pub fn store(&mut self, offset: u64, data: &[u8]) {
        let Some(field) = self.field(offset, data.len()) else {
            return;
        };
        self.bytes[field.offset..field.offset + field.len].copy_from_slice(data);
        if !self.written.contains(&field) {
            self.written.push(field);
        }
    }

    /// What the guest wrote and a new backend must be told: each written field still
    /// writable with `driver_features`, as (offset, bytes).
    pub fn guest_writes(&self, driver_features: u64) -> Vec<(usize, Vec<u8>)> {
        self.written
            .iter()
            .filter(|f| driver_features & f.feature != 0)
            .map(|f| (f.offset, self.bytes[f.offset..f.offset + f.len].to_vec()))
            .collect()
    }

    /// The fields the guest wrote that differ from the backend's `bytes` (its defaults), as
    /// (offset, default bytes): what a reset must tell the backend.
    pub fn changed_from(&self, bytes: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let defaults = Self::new(self.kind, self.num_queues, bytes).bytes;
        self.written
            .iter()
            .map(|f| f.offset..f.offset + f.len)
            .filter(|range| defaults[range.clone()] != self.bytes[range.clone()])
            .map(|range| (range.start, defaults[range].to_vec()))
            .collect()
    }

    /// Forgets what the guest wrote (a device reset, as QEMU restores the original wce):
    /// the space is the backend's `bytes` again.
    pub fn forget_writes(&mut self, bytes: &[u8]) {
        self.written.clear();
        self.refresh(bytes);
    }

    /// Takes a new backend's `bytes`, keeping what the guest wrote. Returns whether the
    /// guest-visible space changed; the generation then moves on, and the caller should send
    /// the driver a configuration-change interrupt.
    pub fn refresh(&mut self, bytes: &[u8]) -> bool {
        let fresh = self.guest_view(bytes);
        if fresh == self.bytes {
            return false;
        }
        self.bytes = fresh;
        self.generation = self.generation.wrapping_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk_space() -> ConfigSpace {
        let mut bytes = vec![0u8; 60];
        bytes[0..8].copy_from_slice(&2048u64.to_le_bytes()); // capacity
        bytes[0x20] = 1; // writeback
        bytes[BLK_NUM_QUEUES..BLK_NUM_QUEUES + 2].copy_from_slice(&4u16.to_le_bytes());
        ConfigSpace::new(DeviceType::Block, 2, &bytes)
    }

    fn read(space: &ConfigSpace, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        space.read(offset, &mut data);
        data
    }

    #[test]
    fn only_wce_is_writable_and_only_with_config_wce() {
        let space = blk_space();
        assert!(space.is_writable(0x20, 1, VIRTIO_BLK_F_CONFIG_WCE));
        assert!(!space.is_writable(0x20, 1, 0));
        assert!(!space.is_writable(0x20, 4, VIRTIO_BLK_F_CONFIG_WCE));
        assert!(!space.is_writable(0x1f, 2, VIRTIO_BLK_F_CONFIG_WCE));
        assert!(!space.is_writable(0, 4, VIRTIO_BLK_F_CONFIG_WCE));
        assert!(!space.is_writable(u64::MAX, 1, VIRTIO_BLK_F_CONFIG_WCE));
        let net = ConfigSpace::new(DeviceType::Net, 3, &[0; 24]);
        assert!(!net.is_writable(0, 1, u64::MAX));
    }

    #[test]
    fn reads_past_the_space_are_zero_and_num_queues_is_the_devices() {
        let space = blk_space();
        assert_eq!(read(&space, 0, 4), 2048u32.to_le_bytes());
        assert_eq!(read(&space, 58, 4), [0, 0, 0, 0]);
        assert_eq!(read(&space, u64::MAX, 2), [0, 0]);
        assert_eq!(read(&space, BLK_NUM_QUEUES as u64, 2), 2u16.to_le_bytes());
    }

    #[test]
    fn guest_writes_survive_a_new_backend_and_changes_bump_the_generation() {
        let mut space = blk_space();
        space.store(0x20, &[0]);
        assert_eq!(
            space.guest_writes(VIRTIO_BLK_F_CONFIG_WCE),
            vec![(0x20, vec![0])]
        );
        assert!(space.guest_writes(0).is_empty());
        // A new backend in writeback, same capacity: the guest's writethrough stays.
        let mut fresh = vec![0u8; 60];
        fresh[0..8].copy_from_slice(&2048u64.to_le_bytes());
        fresh[0x20] = 1;
        assert!(!space.refresh(&fresh));
        assert_eq!(read(&space, 0x20, 1), [0]);
        assert_eq!(space.generation(), 0);
        // A bigger disk: visible, with a new generation.
        fresh[0..8].copy_from_slice(&4096u64.to_le_bytes());
        assert!(space.refresh(&fresh));
        assert_eq!(read(&space, 0, 4), 4096u32.to_le_bytes());
        assert_eq!((read(&space, 0x20, 1), space.generation()), (vec![0], 1));
    }
}
