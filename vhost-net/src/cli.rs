//! The `vhost-net` command line (issue 6), with every value checked before the daemon starts.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

use crate::config::MAX_QUEUE_PAIRS;
use crate::error::{Error, Result};
use cowbird_daemon::{net, socket};

use crate::MacAddress;

/// Largest split virtqueue size the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default virtqueue size, as QEMU and Cloud Hypervisor use.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest MTU (the IPv4 minimum); the virtio spec requires `mtu` ≥ 68.
pub const MIN_MTU: u16 = 68;

/// vhost-user-net backend: serves a guest's virtio-net queues over a vhost-user socket and moves
/// packets to and from a Linux TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "vhost-net", version)]
pub struct Cli {
    /// vhost-user socket: listened on, or connected to with --client.
    #[arg(long, value_name = "PATH", value_parser = socket::parse_path)]
    pub socket: PathBuf,

    /// TAP device to create, or to attach to if it exists with matching flags.
    #[arg(long, value_name = "NAME", value_parser = parse_tap_name)]
    pub tap: String,

    /// Number of rx/tx queue pairs (one TAP queue and one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_queue_pairs)]
    pub num_queue_pairs: u16,

    /// Size of each virtqueue: a power of two up to 32768.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Guest MAC address [default: random locally administered address].
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<MacAddress>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and set on the TAP, 68..=65535.
    #[arg(long, value_name = "N", value_parser = parse_mtu)]
    pub mtu: Option<u16>,

    /// Address and prefix to assign to the TAP on the host side, e.g. 192.168.100.1/24.
    #[arg(long, value_name = "CIDR")]
    pub host_ip: Option<IpCidr>,

    /// Connect to the socket (the frontend listens) instead of listening on it.
    #[arg(long)]
    pub client: bool,
}

/// An IP address with a prefix length, e.g. `192.168.100.1/24` or `fd00::1/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    /// The interface address.
    pub addr: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl FromStr for IpCidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidCidr {
            input: s.to_owned(),
            reason,
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| invalid("expected ADDRESS/PREFIX, e.g. 192.168.100.1/24".into()))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|e| invalid(format!("address '{addr}': {e}")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix.parse::<u8>() {
            Ok(p) if p <= max && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(invalid(format!("prefix length must be 0..={max}"))),
        };
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parses a plain decimal number (no sign, no spaces) as `u64`.
fn parse_number(s: &str) -> Result<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidNumber {
            input: s.to_owned(),
            reason: "expected a decimal number".into(),
        });
    }
    s.parse()
        .map_err(|e: std::num::ParseIntError| Error::InvalidNumber {
            input: s.to_owned(),
            reason: e.to_string(),
        })
}

/// `--queue-size`: a power of two in 1..=32768.
pub fn parse_queue_size(s: &str) -> Result<u16> {
    let value = parse_number(s)?;
    match u16::try_from(value) {
        Ok(size) if size.is_power_of_two() && size <= MAX_QUEUE_SIZE => Ok(size),
        _ => Err(Error::InvalidQueueSize(value)),
    }
}

/// `--num-queue-pairs`: 1..=[`MAX_QUEUE_PAIRS`].
pub fn parse_queue_pairs(s: &str) -> Result<u16> {
    let value = parse_number(s)?;
    match u16::try_from(value) {
        Ok(pairs) if (1..=MAX_QUEUE_PAIRS).contains(&pairs) => Ok(pairs),
        _ => Err(Error::InvalidQueuePairs {
            value,
            max: MAX_QUEUE_PAIRS,
        }),
    }
}

/// `--mtu`: 68..=65535.
pub fn parse_mtu(s: &str) -> Result<u16> {
    let value = parse_number(s)?;
    match u16::try_from(value) {
        Ok(mtu) if mtu >= MIN_MTU => Ok(mtu),
        _ => Err(Error::InvalidMtu(value)),
    }
}

/// `--mac`: a unicast, non-zero MAC address.
pub fn parse_mac(s: &str) -> Result<MacAddress> {
    Ok(s.parse::<MacAddress>()?.check_unicast()?)
}

/// `--tap`: a name Linux accepts for a network interface (`cowbird_daemon::net::parse_tap_name`).
pub fn parse_tap_name(s: &str) -> Result<String> {
    Ok(net::parse_tap_name(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhost-net").chain(args.iter().copied()))
    }

    fn err_text(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    #[test]
    fn minimal_command_line_uses_defaults() {
        let cli = parse(&["--socket", "/run/net.sock", "--tap", "tap0"]).unwrap();
        assert_eq!(
            cli,
            Cli {
                socket: "/run/net.sock".into(),
                tap: "tap0".into(),
                num_queue_pairs: 1,
                queue_size: 256,
                mac: None,
                mtu: None,
                host_ip: None,
                client: false,
            }
        );
    }

    #[test]
    fn full_command_line() {
        let cli = parse(&[
            "--socket",
            "/tmp/n.sock",
            "--tap",
            "vnet%d",
            "--num-queue-pairs",
            "4",
            "--queue-size=1024",
            "--mac",
            "52:54:00:ab:cd:ef",
            "--mtu",
            "9000",
            "--host-ip",
            "192.168.100.1/24",
            "--client",
        ])
        .unwrap();
        assert_eq!(cli.num_queue_pairs, 4);
        assert_eq!(cli.queue_size, 1024);
        assert_eq!(cli.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(cli.mtu, Some(9000));
        assert_eq!(cli.host_ip.unwrap().to_string(), "192.168.100.1/24");
        assert_eq!(cli.tap, "vnet%d");
        assert!(cli.client);
    }

    #[test]
    fn socket_and_tap_are_required() {
        assert_eq!(
            parse(&["--tap", "tap0"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["--socket", "/s"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn queue_size_must_be_a_power_of_two_up_to_32768() {
        for ok in ["1", "2", "64", "256", "32768"] {
            assert_eq!(parse_queue_size(ok).unwrap().to_string(), ok);
        }
        for bad in ["0", "3", "255", "65536", "65535", "100000"] {
            assert!(
                matches!(parse_queue_size(bad), Err(Error::InvalidQueueSize(_))),
                "{bad}"
            );
        }
        for bad in [
            "",
            "-1",
            "+2",
            " 2",
            "0x10",
            "abc",
            "99999999999999999999999",
        ] {
            assert!(
                matches!(parse_queue_size(bad), Err(Error::InvalidNumber { .. })),
                "{bad}"
            );
        }
        let text = err_text(&["--socket", "/s", "--tap", "t", "--queue-size", "100"]);
        assert!(
            text.contains("queue size 100 is not a power of two between 1 and 32768"),
            "{text}"
        );
    }

    #[test]
    fn queue_pairs_are_1_to_31() {
        assert_eq!(parse_queue_pairs("1").unwrap(), 1);
        assert_eq!(parse_queue_pairs("31").unwrap(), 31);
        for bad in ["0", "32", "256", "70000"] {
            assert!(
                matches!(parse_queue_pairs(bad), Err(Error::InvalidQueuePairs { .. })),
                "{bad}"
            );
        }
        let text = err_text(&["--socket", "/s", "--tap", "t", "--num-queue-pairs", "0"]);
        assert!(
            text.contains("number of queue pairs 0 is outside 1..=31"),
            "{text}"
        );
    }

    #[test]
    fn mtu_range() {
        assert_eq!(parse_mtu("68").unwrap(), 68);
        assert_eq!(parse_mtu("1500").unwrap(), 1500);
        assert_eq!(parse_mtu("65535").unwrap(), 65535);
        for bad in ["0", "67", "65536"] {
            assert!(matches!(parse_mtu(bad), Err(Error::InvalidMtu(_))), "{bad}");
        }
        assert!(matches!(
            parse_mtu("1500b"),
            Err(Error::InvalidNumber { .. })
        ));
    }

    #[test]
    fn mac_must_be_well_formed_unicast() {
        assert!(matches!(
            parse_mac("52:54:00:12:34"),
            Err(Error::Net(net::Error::InvalidMac { .. }))
        ));
        assert!(matches!(
            parse_mac("ff:ff:ff:ff:ff:ff"),
            Err(Error::Net(net::Error::UnusableMac { .. }))
        ));
        assert!(matches!(
            parse_mac("00:00:00:00:00:00"),
            Err(Error::Net(net::Error::UnusableMac { .. }))
        ));
        let text = err_text(&["--socket", "/s", "--tap", "t", "--mac", "01:00:5e:00:00:01"]);
        assert!(text.contains("01:00:5e:00:00:01"), "{text}");
        assert!(text.contains("multicast"), "{text}");
    }

    #[test]
    fn tap_names_follow_the_kernel_rules() {
        assert_eq!(parse_tap_name("vnet%d").unwrap(), "vnet%d");
        assert!(matches!(
            parse_tap_name("1234567890123456"),
            Err(Error::Net(net::Error::InvalidTapName { .. }))
        ));
        let text = err_text(&["--socket", "/s", "--tap", "a/b"]);
        assert!(
            text.contains("'/', ':' and whitespace are not allowed"),
            "{text}"
        );
    }

    #[test]
    fn host_ip_cidr() {
        let v4: IpCidr = "10.0.0.1/24".parse().unwrap();
        assert_eq!(v4.addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4.prefix_len, 24);
        let v6: IpCidr = "fd00::1/64".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00::1/64");
        assert_eq!("10.0.0.1/32".parse::<IpCidr>().unwrap().prefix_len, 32);
        assert_eq!("::/128".parse::<IpCidr>().unwrap().prefix_len, 128);
        for bad in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/33",
            "10.0.0.1/-1",
            "10.0.0.1/+8",
            "10.0.0/24",
            "fd00::1/129",
            "host/24",
            "/24",
            "10.0.0.1/24/1",
        ] {
            assert!(
                matches!(bad.parse::<IpCidr>(), Err(Error::InvalidCidr { .. })),
                "{bad}"
            );
        }
        let text = err_text(&["--socket", "/s", "--tap", "t", "--host-ip", "10.0.0.1/40"]);
        assert!(text.contains("prefix length must be 0..=32"), "{text}");
    }
}
