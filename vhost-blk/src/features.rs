//! The virtio and vhost-user feature bits the device offers.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// The virtio feature bits offered for a disk (`read_only` adds VIRTIO_BLK_F_RO).
///
/// GET_ID needs no feature bit. GEOMETRY is not offered: the device has no cylinders.
pub fn device_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut features = bits.iter().fold(0u64, |acc, &b| acc | (1u64 << b));
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The vhost-user protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Whether feature `bit` is set in `features`.
pub fn has(features: u64, bit: u32) -> bool {
    bit < 64 && features & (1u64 << bit) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_adds_ro_only() {
        let rw = device_features(false);
        let ro = device_features(true);
        assert_eq!(ro & !rw, 1 << VIRTIO_BLK_F_RO);
        assert!(has(rw, VIRTIO_F_VERSION_1));
        assert!(has(rw, 30), "VHOST_USER_F_PROTOCOL_FEATURES");
        assert!(!has(rw, VIRTIO_BLK_F_RO));
        assert!(!has(rw, 99));
    }
}
