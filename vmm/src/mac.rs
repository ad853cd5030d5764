//! MAC addresses for `--net mac=...`.
//!
//! The VMM keeps its own small copy of this type instead of using `vhost-net`'s: the VMM talks
//! to backends only over vhost-user sockets and never links them (docs/architecture.md).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A 48-bit Ethernet MAC address, printed as `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// An address from its six octets, in transmission order.
    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    /// The six octets, in transmission order (the order of the virtio-net `mac` field).
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for group (multicast or broadcast) addresses: lowest bit of the first octet.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = Error;

    /// Parses six `:`-separated pairs of hex digits and requires a unicast, non-zero address,
    /// since the only use is a NIC's own address.
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidMac {
            input: s.to_owned(),
            reason,
        };
        let groups: Vec<&str> = s.split(':').collect();
        if groups.len() != 6 {
            return Err(invalid("expected six ':'-separated octets"));
        }
        let mut octets = [0u8; 6];
        for (octet, group) in octets.iter_mut().zip(groups) {
            if group.len() != 2 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("each octet must be exactly two hex digits"));
            }
            *octet = u8::from_str_radix(group, 16)
                .map_err(|_| invalid("each octet must be exactly two hex digits"))?;
        }
        let mac = Self(octets);
        if mac.is_multicast() {
            return Err(invalid("a NIC address must be unicast (first octet even)"));
        }
        if octets == [0; 6] {
            return Err(invalid("a NIC address cannot be all zeros"));
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mac: MacAddress = "52:54:00:AB:cd:0F".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
    }

    #[test]
    fn rejects_malformed_and_unusable_addresses() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5",
            "52:54:00:12:34:5x",
            "52:54:00:12:34:+5",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(
                matches!(bad.parse::<MacAddress>(), Err(Error::InvalidMac { .. })),
                "{bad:?}"
            );
        }
    }
}
