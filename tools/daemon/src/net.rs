//! Network names a NIC is given on a command line (`vhost-net`'s and `vmm`'s): Ethernet MAC
//! addresses, parsed and printed in the usual `52:54:00:12:34:56` form, random locally
//! administered unicast addresses for NICs given none, and TAP interface names.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::str::FromStr;

/// A rejected MAC address or interface name.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that is not six colon-separated pairs of hex digits.
    #[error("invalid MAC address '{input}': {reason}")]
    InvalidMac {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A well-formed MAC address that a NIC cannot use as its own address.
    #[error("MAC address {mac} cannot be a NIC's address: {reason}")]
    UnusableMac {
        /// The rejected address.
        mac: MacAddress,
        /// Why (multicast, all zeros).
        reason: &'static str,
    },
    /// Reading the host's random source failed.
    #[error("cannot read random bytes from {path}: {source}")]
    Random {
        /// The random source that failed.
        path: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A network interface name the kernel would refuse.
    #[error("invalid interface name '{name}': {reason}")]
    InvalidTapName {
        /// The name as given.
        name: String,
        /// What the kernel would object to.
        reason: &'static str,
    },
}

impl Error {
    /// What is wrong, without the value (for messages that name it already).
    pub fn reason(&self) -> String {
        match self {
            Error::InvalidMac { reason, .. }
            | Error::UnusableMac { reason, .. }
            | Error::InvalidTapName { reason, .. } => (*reason).to_owned(),
            Error::Random { .. } => self.to_string(),
        }
    }
}

/// Shorthand for results carrying this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Bit 0 of the first octet: set for multicast (and broadcast) addresses.
const MULTICAST_BIT: u8 = 0x01;
/// Bit 1 of the first octet: set for locally administered addresses.
const LOCAL_BIT: u8 = 0x02;
/// Where random addresses come from.
const RANDOM_SOURCE: &str = "/dev/urandom";

/// A 48-bit Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// The number of octets in an address.
    pub const LEN: usize = 6;

    /// An address from its six octets, in transmission order.
    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    /// The six octets, in transmission order (the order of the virtio-net `mac` field).
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for group (multicast or broadcast) addresses.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & MULTICAST_BIT != 0
    }

    /// True for locally administered addresses (not assigned by a vendor OUI).
    pub const fn is_locally_administered(&self) -> bool {
        self.0[0] & LOCAL_BIT != 0
    }

    /// True for 00:00:00:00:00:00.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Checks that the address can be a NIC's own address: unicast and not all zeros.
    pub fn check_unicast(self) -> Result<Self> {
        if self.is_multicast() {
            return Err(Error::UnusableMac {
                mac: self,
                reason: "it is a multicast address (lowest bit of the first octet set)",
            });
        }
        if self.is_zero() {
            return Err(Error::UnusableMac {
                mac: self,
                reason: "it is all zeros",
            });
        }
        Ok(self)
    }

    /// Turns six arbitrary bytes into a locally administered unicast address by clearing the
    /// multicast bit and setting the local bit of the first octet.
    pub const fn local_unicast_from(mut octets: [u8; 6]) -> Self {
        octets[0] = (octets[0] & !MULTICAST_BIT) | LOCAL_BIT;
        Self(octets)
    }

    /// A random locally administered unicast address, from the kernel's random source.
    pub fn random_local() -> Result<Self> {
        let random_error = |source| Error::Random {
            path: RANDOM_SOURCE,
            source,
        };
        let mut octets = [0u8; 6];
        File::open(RANDOM_SOURCE)
            .and_then(|mut f| f.read_exact(&mut octets))
            .map_err(random_error)?;
        Ok(Self::local_unicast_from(octets))
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

    /// Parses exactly six `:`-separated groups of two hex digits (either case).
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidMac {
            input: s.to_owned(),
            reason,
        };
        let mut octets = [0u8; 6];
        let mut groups = s.split(':');
        for octet in &mut octets {
            let group = groups
                .next()
                .ok_or_else(|| invalid("expected six ':'-separated octets"))?;
            if group.len() != 2 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("each octet must be exactly two hex digits"));
            }
            *octet = u8::from_str_radix(group, 16)
                .map_err(|_| invalid("each octet must be exactly two hex digits"))?;
        }
        if groups.next().is_some() {
            return Err(invalid("expected six ':'-separated octets"));
        }
        Ok(Self(octets))
    }
}

impl From<[u8; 6]> for MacAddress {
    fn from(octets: [u8; 6]) -> Self {
        Self(octets)
    }
}

/// A name Linux accepts for a network interface (the kernel's `dev_valid_name`): 1 to 15
/// bytes, not `.` or `..`, no `/`, `:`, whitespace or control characters. A `%d` template
/// such as `tap%d` is allowed; the kernel picks the number.
pub fn parse_tap_name(s: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidTapName {
        name: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(invalid("it is empty"));
    }
    if s.len() > MAX_IFNAME_LEN {
        return Err(invalid("longer than 15 bytes"));
    }
    if s == "." || s == ".." {
        return Err(invalid("'.' and '..' are reserved"));
    }
    if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(invalid("'/', ':' and whitespace are not allowed"));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid("control characters are not allowed"));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn accepts_upper_case_and_prints_lower_case() {
        let mac: MacAddress = "AA:bB:0C:dd:EE:ff".parse().unwrap();
        assert_eq!(mac.octets(), [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff]);
        assert_eq!(mac.to_string(), "aa:bb:0c:dd:ee:ff");
    }

    #[test]
    fn round_trips_every_octet_value() {
        for v in 0..=255u8 {
            let mac = MacAddress::new([v, 255 - v, v, 0, v, 1]);
            assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        for bad in [
            "",
            ":",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:56:",
            ":52:54:00:12:34:56",
            "52-54-00-12-34-56",
            "5254.0012.3456",
            "525400123456",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "2:54:00:12:34:56",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:+5",
            "52:54:00:12:34: 5",
            " 52:54:00:12:34:56",
            "52:54:00:12:34:56 ",
            "52::54:00:12:34",
            "é2:54:00:12:34:56",
        ] {
            match bad.parse::<MacAddress>() {
                Err(Error::InvalidMac { input, .. }) => assert_eq!(input, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn error_message_names_the_input() {
        let err = "52:54:00:12:34".parse::<MacAddress>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid MAC address '52:54:00:12:34': expected six ':'-separated octets"
        );
    }

    #[test]
    fn classifies_addresses() {
        let broadcast = MacAddress::new([0xff; 6]);
        assert!(broadcast.is_multicast());
        let ipv4_multicast: MacAddress = "01:00:5e:00:00:01".parse().unwrap();
        assert!(ipv4_multicast.is_multicast());
        assert!(!ipv4_multicast.is_locally_administered());
        let qemu: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        assert!(!qemu.is_multicast());
        assert!(qemu.is_locally_administered());
        let vendor: MacAddress = "00:1b:21:00:00:01".parse().unwrap();
        assert!(!vendor.is_locally_administered());
    }

    #[test]
    fn check_unicast_rejects_group_and_zero_addresses() {
        assert!(matches!(
            MacAddress::new([0xff; 6]).check_unicast(),
            Err(Error::UnusableMac { .. })
        ));
        assert!(matches!(
            MacAddress::new([0x33, 0x33, 0, 0, 0, 1]).check_unicast(),
            Err(Error::UnusableMac { .. })
        ));
        assert!(matches!(
            MacAddress::new([0; 6]).check_unicast(),
            Err(Error::UnusableMac { .. })
        ));
        let ok = MacAddress::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(ok.check_unicast().unwrap(), ok);
    }

    #[test]
    fn local_unicast_from_fixes_only_the_two_flag_bits() {
        let mac = MacAddress::local_unicast_from([0xff, 1, 2, 3, 4, 5]);
        assert_eq!(mac.octets(), [0xfe, 1, 2, 3, 4, 5]);
        let mac = MacAddress::local_unicast_from([0x00, 1, 2, 3, 4, 5]);
        assert_eq!(mac.octets(), [0x02, 1, 2, 3, 4, 5]);
        for first in 0..=255u8 {
            let mac = MacAddress::local_unicast_from([first, 0, 0, 0, 0, 0]);
            assert!(!mac.is_multicast());
            assert!(mac.is_locally_administered());
            assert_eq!(mac.octets()[0] & 0xfc, first & 0xfc);
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let macs: Vec<MacAddress> = (0..16)
            .map(|_| MacAddress::random_local().unwrap())
            .collect();
        for mac in &macs {
            assert!(!mac.is_multicast(), "{mac}");
            assert!(mac.is_locally_administered(), "{mac}");
            assert!(mac.check_unicast().is_ok(), "{mac}");
        }
        // 46 random bits each: sixteen draws colliding means the source is not random.
        let mut sorted = macs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), macs.len(), "{macs:?}");
    }

    #[test]
    fn tap_names_follow_the_kernel_rules() {
        for ok in ["tap0", "t", "vnet%d", "a-b_c.d", "123456789012345"] {
            assert_eq!(parse_tap_name(ok).unwrap(), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:1",
            "a b",
            "tab\there",
            "1234567890123456",
            "nul\0x",
        ] {
            match parse_tap_name(bad) {
                Err(e @ Error::InvalidTapName { .. }) => assert!(!e.reason().is_empty()),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}
