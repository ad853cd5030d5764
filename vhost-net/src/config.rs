//! The virtio-net device configuration space, the feature bits the daemon offers, and what the
//! features the guest acknowledged mean for the TAP device (offloads and vnet header size).
//!
//! Layout and rules from the virtio 1.2 specification, section 5.1 "Network Device".

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::MacAddress;

/// Size in bytes of the whole virtio-net configuration space (`struct virtio_net_config`).
pub const CONFIG_SPACE_SIZE: usize = size_of::<virtio_net_config>();

/// `speed` value meaning "unknown" (VIRTIO_NET_F_SPEED_DUPLEX is not offered).
pub const SPEED_UNKNOWN: u32 = u32::MAX;
/// `duplex` value meaning "unknown", as Linux and QEMU use it.
pub const DUPLEX_UNKNOWN: u8 = 0xff;

/// The most queue pairs the spec allows a device to advertise (`max_virtqueue_pairs`).
pub const SPEC_MAX_QUEUE_PAIRS: u16 = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX as u16;

/// The most queue pairs this daemon serves. One TAP queue per pair (the Linux TUN driver
/// allows 256, `MAX_TAP_QUEUES`), but `vhost-user-backend` maps queues to worker threads with
/// 64-bit masks, so all queues (two per pair and the control queue) must fit in 64: 31 pairs.
pub const MAX_QUEUE_PAIRS: u16 = 31;

/// Size of the vnet header in front of every packet when VERSION_1 or MRG_RXBUF is negotiated
/// (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();

/// Size of the legacy vnet header without `num_buffers` (`struct virtio_net_hdr`).
pub const LEGACY_VNET_HDR_LEN: usize = 10;

/// TUNSETOFFLOAD flags from `<linux/if_tun.h>`; not exported by the `libc` crate.
pub mod tun_offload {
    /// The TAP may hand us packets with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const TUN_F_CSUM: u32 = 0x01;
    /// The TAP may hand us TCPv4 super-packets.
    pub const TUN_F_TSO4: u32 = 0x02;
    /// The TAP may hand us TCPv6 super-packets.
    pub const TUN_F_TSO6: u32 = 0x04;
    /// The TAP may hand us TSO packets with ECN/CWR set.
    pub const TUN_F_TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload; accepted by Linux since 4.14 but never produced any more.
    pub const TUN_F_UFO: u32 = 0x10;
}

/// The feature bit `bit` as a mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// The virtio-net device configuration space as the daemon serves it (GET_CONFIG).
///
/// Multi-byte fields are little-endian: the daemon requires VIRTIO_F_VERSION_1, so there is no
/// legacy guest-endian layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfigSpace {
    /// The guest NIC's MAC address (`mac`, meaningful with VIRTIO_NET_F_MAC).
    pub mac: MacAddress,
    /// Whether the link is reported up (`status`, meaningful with VIRTIO_NET_F_STATUS).
    pub link_up: bool,
    /// Number of rx/tx queue pairs the device has (`max_virtqueue_pairs`, with VIRTIO_NET_F_MQ).
    pub max_virtqueue_pairs: u16,
    /// The MTU the guest should use (`mtu`, with VIRTIO_NET_F_MTU); `None` writes 0 and the
    /// daemon must then not offer VIRTIO_NET_F_MTU.
    pub mtu: Option<u16>,
}

impl NetConfigSpace {
    /// The configuration space bytes, laid out as `struct virtio_net_config`.
    ///
    /// Fields of features the daemon never offers are filled as "unknown" (speed, duplex) or
    /// zero (RSS and hash reporting).
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        fn put(bytes: &mut [u8], offset: usize, value: &[u8]) {
            bytes[offset..offset + value.len()].copy_from_slice(value);
        }
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        let mut bytes = [0u8; CONFIG_SPACE_SIZE];
        put(
            &mut bytes,
            offset_of!(virtio_net_config, mac),
            &self.mac.octets(),
        );
        put(
            &mut bytes,
            offset_of!(virtio_net_config, status),
            &status.to_le_bytes(),
        );
        put(
            &mut bytes,
            offset_of!(virtio_net_config, max_virtqueue_pairs),
            &self.max_virtqueue_pairs.to_le_bytes(),
        );
        put(
            &mut bytes,
            offset_of!(virtio_net_config, mtu),
            &self.mtu.unwrap_or(0).to_le_bytes(),
        );
        put(
            &mut bytes,
            offset_of!(virtio_net_config, speed),
            &SPEED_UNKNOWN.to_le_bytes(),
        );
        put(
            &mut bytes,
            offset_of!(virtio_net_config, duplex),
            &[DUPLEX_UNKNOWN],
        );
        bytes
    }

    /// The `size` bytes at `offset`, as a GET_CONFIG reply; `None` when the range is not
    /// entirely inside the configuration space (vhost-user then replies with an empty payload).
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        self.to_bytes().get(start..end).map(<[u8]>::to_vec)
    }
}

/// What the daemon's offered feature set depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureOptions {
    /// An MTU was configured, so VIRTIO_NET_F_MTU is offered.
    pub mtu: bool,
    /// The TAP device accepted TUN_F_UFO, so HOST_UFO and GUEST_UFO are offered.
    pub ufo: bool,
}

/// The virtio feature bits the daemon offers to the driver.
///
/// VERSION_1, checksum and TSO offload both ways, MRG_RXBUF, EVENT_IDX, a control queue with
/// MQ, MAC and STATUS always; MTU and UFO as `opts` says. The device adds
/// VHOST_USER_F_PROTOCOL_FEATURES (see `device::Device::features`). Packed rings are not offered: `virtio-queue` only
/// implements split rings.
pub fn device_features(opts: FeatureOptions) -> u64 {
    let mut features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_RING_F_EVENT_IDX)
        | feature(VIRTIO_NET_F_CSUM)
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(VIRTIO_NET_F_HOST_TSO4)
        | feature(VIRTIO_NET_F_HOST_TSO6)
        | feature(VIRTIO_NET_F_GUEST_TSO4)
        | feature(VIRTIO_NET_F_GUEST_TSO6)
        | feature(VIRTIO_NET_F_MRG_RXBUF)
        | feature(VIRTIO_NET_F_CTRL_VQ)
        | feature(VIRTIO_NET_F_MQ)
        | feature(VIRTIO_NET_F_MAC)
        | feature(VIRTIO_NET_F_STATUS);
    if opts.mtu {
        features |= feature(VIRTIO_NET_F_MTU);
    }
    if opts.ufo {
        features |= feature(VIRTIO_NET_F_HOST_UFO) | feature(VIRTIO_NET_F_GUEST_UFO);
    }
    features
}

/// Number of virtqueues the device exposes for `pairs` queue pairs: rx and tx per pair plus
/// the control queue (VIRTIO_NET_F_CTRL_VQ is always offered).
pub const fn num_queues(pairs: u16) -> usize {
    2 * pairs as usize + 1
}

/// The TUNSETOFFLOAD flags matching the features the guest acknowledged.
///
/// The flags say what the TAP may hand to us, i.e. what the guest accepts on its rx queues, so
/// they follow the GUEST_* features. Linux refuses TSO flags without TUN_F_CSUM and TSO_ECN
/// without a TSO flag (EINVAL), as does the spec (GUEST_TSO* requires GUEST_CSUM), so those
/// are only set together.
pub fn tun_offload_flags(acked: u64) -> u32 {
    use tun_offload::*;
    let has = |bit| acked & feature(bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
        flags |= TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= TUN_F_UFO;
    }
    flags
}

/// The vnet header length for TUNSETVNETHDRSZ and for framing packets in guest buffers:
/// 12 bytes with VERSION_1 or MRG_RXBUF, else the 10-byte legacy header.
pub fn vnet_hdr_len(acked: u64) -> usize {
    if acked & (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN
    } else {
        LEGACY_VNET_HDR_LEN
    }
}

/// Names of the virtio-net feature bits the daemon knows, for one-line negotiation logs.
const FEATURE_NAMES: &[(u32, &str)] = &[
    (VIRTIO_NET_F_CSUM, "CSUM"),
    (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
    (VIRTIO_NET_F_MTU, "MTU"),
    (VIRTIO_NET_F_MAC, "MAC"),
    (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
    (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
    (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
    (VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
    (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
    (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
    (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
    (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
    (VIRTIO_NET_F_STATUS, "STATUS"),
    (VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
    (VIRTIO_NET_F_MQ, "MQ"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    // VHOST_USER_F_PROTOCOL_FEATURES, a vhost-user bit in the virtio feature word.
    (30, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
];

/// The feature set as `NAME|NAME|bit40`, lowest bit first; bits without a name here print as
/// `bitN`. An empty set prints as `none`.
pub fn describe_features(features: u64) -> String {
    let names: Vec<String> = (0..64)
        .filter(|bit| features & feature(*bit) != 0)
        .map(|bit| match FEATURE_NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => (*name).to_owned(),
            None => format!("bit{bit}"),
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::tun_offload::*;
    use super::*;

    fn space() -> NetConfigSpace {
        NetConfigSpace {
            mac: "52:54:00:12:34:56".parse().unwrap(),
            link_up: true,
            max_virtqueue_pairs: 2,
            mtu: Some(9000),
        }
    }

    #[test]
    fn config_space_is_the_spec_layout() {
        // virtio 1.2, 5.1.4: mac[6] @0, le16 status @6, le16 max_virtqueue_pairs @8,
        // le16 mtu @10, le32 speed @12, u8 duplex @16, u8 rss_max_key_size @17,
        // le16 rss_max_indirection_table_length @18, le32 supported_hash_types @20.
        assert_eq!(CONFIG_SPACE_SIZE, 24);
        let bytes = space().to_bytes();
        assert_eq!(
            bytes,
            [
                0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // mac
                0x01, 0x00, // status: VIRTIO_NET_S_LINK_UP
                0x02, 0x00, // max_virtqueue_pairs
                0x28, 0x23, // mtu 9000 = 0x2328
                0xff, 0xff, 0xff, 0xff, // speed unknown
                0xff, // duplex unknown
                0x00, 0x00, 0x00, // rss_max_key_size, rss_max_indirection_table_length
                0x00, 0x00, 0x00, 0x00, // supported_hash_types
            ]
        );
    }

    #[test]
    fn link_down_and_no_mtu_write_zeros() {
        let cfg = NetConfigSpace {
            link_up: false,
            mtu: None,
            max_virtqueue_pairs: 256,
            ..space()
        };
        let bytes = cfg.to_bytes();
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(&bytes[8..10], &[0x00, 0x01]);
        assert_eq!(&bytes[10..12], &[0, 0]);
    }

    #[test]
    fn reads_inside_the_space_and_refuses_outside() {
        let cfg = space();
        assert_eq!(cfg.read(0, 6).unwrap(), cfg.mac.octets());
        assert_eq!(cfg.read(8, 2).unwrap(), vec![2, 0]);
        assert_eq!(cfg.read(0, 24).unwrap(), cfg.to_bytes().to_vec());
        assert_eq!(cfg.read(24, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(cfg.read(20, 5), None);
        assert_eq!(cfg.read(25, 0), None);
        assert_eq!(cfg.read(u32::MAX, 2), None);
        assert_eq!(cfg.read(8, u32::MAX), None);
    }

    #[test]
    fn offered_features_match_issue_6() {
        let f = device_features(FeatureOptions::default());
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
        ] {
            assert!(f & feature(bit) != 0, "bit {bit} missing");
        }
        assert_eq!(f & feature(VIRTIO_NET_F_MTU), 0);
        assert_eq!(f & feature(VIRTIO_NET_F_HOST_UFO), 0);
        assert_eq!(f & feature(VIRTIO_NET_F_GUEST_UFO), 0);
        // Packed rings are not offered (virtio-queue has split rings only).
        assert_eq!(
            f & feature(virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED),
            0
        );

        let all = device_features(FeatureOptions {
            mtu: true,
            ufo: true,
        });
        assert_eq!(
            all ^ f,
            feature(VIRTIO_NET_F_MTU)
                | feature(VIRTIO_NET_F_HOST_UFO)
                | feature(VIRTIO_NET_F_GUEST_UFO)
        );
    }

    #[test]
    fn offered_features_respect_the_spec_dependencies() {
        // virtio 1.2, 5.1.3.1: a feature may only be offered with the features it requires.
        let requires = [
            (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_CSUM),
            (VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_CSUM),
            (VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_CSUM),
            (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM),
            (VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_CSUM),
            (VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_CSUM),
            (VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ),
        ];
        for opts in [
            FeatureOptions::default(),
            FeatureOptions {
                mtu: true,
                ufo: true,
            },
        ] {
            let f = device_features(opts);
            for (feat, needs) in requires {
                if f & feature(feat) != 0 {
                    assert!(f & feature(needs) != 0, "{feat} offered without {needs}");
                }
            }
        }
    }

    #[test]
    fn queue_counts_include_the_control_queue() {
        assert_eq!(num_queues(1), 3);
        assert_eq!(num_queues(2), 5);
        assert_eq!(num_queues(MAX_QUEUE_PAIRS), 63);
        const { assert!(MAX_QUEUE_PAIRS <= SPEC_MAX_QUEUE_PAIRS) };
    }

    #[test]
    fn tun_offloads_follow_guest_features() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | feature(*b));
        assert_eq!(tun_offload_flags(0), 0);
        // Host-side (tx) offloads do not concern TUNSETOFFLOAD.
        assert_eq!(
            tun_offload_flags(f(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4])),
            0
        );
        assert_eq!(tun_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM])), TUN_F_CSUM);
        assert_eq!(
            tun_offload_flags(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO,
            ])),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        // TSO without checksum offload would make TUNSETOFFLOAD fail with EINVAL.
        assert_eq!(tun_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        // ECN without TSO likewise.
        assert_eq!(
            tun_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
            TUN_F_CSUM
        );
        // What a guest acking everything we offer gets.
        assert_eq!(
            tun_offload_flags(device_features(FeatureOptions::default())),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
    }

    #[test]
    fn vnet_header_length() {
        assert_eq!(VNET_HDR_LEN, 12);
        assert_eq!(vnet_hdr_len(feature(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(vnet_hdr_len(feature(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(vnet_hdr_len(feature(VIRTIO_NET_F_CSUM)), 10);
    }

    #[test]
    fn describes_features() {
        assert_eq!(describe_features(0), "none");
        assert_eq!(
            describe_features(feature(VIRTIO_NET_F_CSUM) | feature(VIRTIO_F_VERSION_1)),
            "CSUM|VERSION_1"
        );
        assert_eq!(
            describe_features(feature(VIRTIO_NET_F_MAC) | feature(40)),
            "MAC|bit40"
        );
    }
}
