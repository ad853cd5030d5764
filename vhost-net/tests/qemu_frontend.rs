//! vhost-net with QEMU 10 as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `virtio-net-pci` NIC on a vhost-user netdev, guest memory in a shared memfd, and no guest
//! OS: the NIC's iPXE option ROM drives the device. iPXE's DHCP exchange proves both
//! directions of the datapath: its DISCOVER must come out of the TAP (guest → TAP), the OFFER
//! the test sends into the TAP must reach iPXE (TAP → guest), which then sends a REQUEST for
//! the offered address.
//!
//! QEMU sends SET_VRING_ENABLE before SET_FEATURES, which `vhost` 0.18 refuses by dropping
//! the connection; without the daemon's relay putting it after SET_FEATURES this test fails
//! within seconds.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The guest NIC's MAC address (QEMU's `mac=`).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xc0, 0xb1, 0x4d];
const OFFERED_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const DHCP_COOKIE: [u8; 4] = [99, 130, 83, 99];
const DHCPDISCOVER: u8 = 1;
const DHCPOFFER: u8 = 2;
const DHCPREQUEST: u8 = 3;

/// A DHCP message from the guest, as far as this test needs it.
#[derive(Debug)]
struct DhcpRequest {
    xid: [u8; 4],
    chaddr: [u8; 6],
    message_type: u8,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
}

fn parse_dhcp(packet: &[u8]) -> Option<DhcpRequest> {
    // op BOOTREQUEST, Ethernet addresses, the magic cookie after the fixed part.
    if packet.len() < 240 || packet[0] != 1 || packet[1] != 1 || packet[2] != 6 {
        return None;
    }
    if packet[236..240] != DHCP_COOKIE {
        return None;
    }
    let mut msg = DhcpRequest {
        xid: packet[4..8].try_into().ok()?,
        chaddr: packet[28..34].try_into().ok()?,
        message_type: 0,
        requested_ip: None,
        server_id: None,
    };
    let addr = |v: &[u8]| <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
    let mut options = &packet[240..];
    while let [code, rest @ ..] = options {
        match code {
            0 => options = rest,
            255 => break,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(len))?;
                match code {
                    53 => msg.message_type = *value.first()?,
                    50 => msg.requested_ip = addr(value),
                    54 => msg.server_id = addr(value),
                    _ => {}
                }
                options = &rest[usize::from(len)..];
            }
        }
    }
    Some(msg)
}

/// A DHCPOFFER of [`OFFERED_IP`] for `discover`, broadcast.
fn offer(discover: &DhcpRequest) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[..4].copy_from_slice(&[2, 1, 6, 0]);
    p[4..8].copy_from_slice(&discover.xid);
    p[10] = 0x80; // broadcast flag
    p[16..20].copy_from_slice(&OFFERED_IP.octets());
    p[20..24].copy_from_slice(&SERVER_IP.octets());
    p[28..34].copy_from_slice(&discover.chaddr);
    p.extend_from_slice(&DHCP_COOKIE);
    p.extend_from_slice(&[53, 1, DHCPOFFER]);
    p.extend_from_slice(&[54, 4]);
    p.extend_from_slice(&SERVER_IP.octets());
    p.extend_from_slice(&[51, 4, 0, 0, 0x0e, 0x10]); // lease: one hour
    p.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
    p.push(255);
    p.resize(300, 0);
    p
}

/// A UDP socket on the DHCP server port inside `ns`, sending out of `tap`.
fn dhcp_server_socket(ns: &Netns, tap: &str) -> UdpSocket {
    let sock = ns.run_inside(|| {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 67)).expect("bind UDP port 67 in the namespace")
    });
    sock.set_broadcast(true).unwrap();
    // SAFETY: the option value is the interface name's bytes with their length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            tap.as_ptr().cast(),
            tap.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_BINDTODEVICE: {}",
        std::io::Error::last_os_error()
    );
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock
}

fn start_qemu(dir: &std::path::Path, socket: &std::path::Path) -> Proc {
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "64",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-serial", "none", "-monitor", "none"])
    // vhost-user needs guest memory the daemon can map.
    .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
    .args(["-machine", "pc,memory-backend=mem"])
    .arg("-chardev")
    .arg(format!("socket,id=c0,path={}", socket.display()))
    .args(["-netdev", "vhost-user,chardev=c0,id=n0"])
    .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
    .args(["-boot", "n"]);
    Proc::spawn("qemu-system-x86_64", cmd, dir.join("qemu.log"))
}

#[test]
fn qemu_negotiates_and_ipxe_dhcp_crosses_both_directions() {
    require_environment();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    let mut daemon = Daemon::start(&ns, dir.path(), &[]);
    let server = dhcp_server_socket(&ns, &daemon.tap);
    let mut qemu = start_qemu(dir.path(), &daemon.socket);

    let deadline = Instant::now() + Duration::from_secs(180);
    let mut offered = None;
    let mut buf = [0u8; 1500];
    let request = loop {
        let log = daemon.proc.log();
        assert!(
            !log.contains("connection failed") && !log.contains("frontend disconnected"),
            "the daemon lost QEMU:\n{log}\nQEMU:\n{}",
            qemu.log()
        );
        if let Some(status) = qemu.try_wait() {
            panic!("QEMU exited with {status}:\n{}\ndaemon:\n{log}", qemu.log());
        }
        assert!(
            Instant::now() < deadline,
            "no DHCP exchange with iPXE (offer sent: {}):\n{log}\nQEMU:\n{}",
            offered.is_some(),
            qemu.log()
        );
        let Ok((n, _)) = server.recv_from(&mut buf) else {
            continue;
        };
        let Some(msg) = parse_dhcp(&buf[..n]) else {
            continue;
        };
        assert_eq!(msg.chaddr, GUEST_MAC, "{msg:?}");
        match msg.message_type {
            DHCPDISCOVER => {
                let packet = offer(&msg);
                server
                    .send_to(&packet, (Ipv4Addr::BROADCAST, 68))
                    .expect("send DHCPOFFER");
                offered = Some(msg.xid);
            }
            DHCPREQUEST if offered.is_some() => break msg,
            _ => {}
        }
    };
    // The REQUEST names what only the OFFER carried: it reached the guest.
    assert_eq!(Some(request.xid), offered);
    assert_eq!(request.requested_ip, Some(OFFERED_IP), "{request:?}");
    assert_eq!(request.server_id, Some(SERVER_IP), "{request:?}");

    drop(qemu);
    let log = daemon.stop();
    assert!(
        log.contains("replayed") && log.contains("early SET_VRING_ENABLE"),
        "QEMU no longer sends SET_VRING_ENABLE early? {log}"
    );
    let negotiated = log
        .lines()
        .find(|l| l.contains("negotiated"))
        .unwrap_or_else(|| panic!("no negotiation logged:\n{log}"));
    assert!(negotiated.contains("VERSION_1"), "{negotiated}");
    let counters = pair_counters(&log);
    assert!(
        matches!(counters[..], [(0, tx, rx)] if tx >= 2 && rx >= 1),
        "{counters:?}\n{log}"
    );
}
