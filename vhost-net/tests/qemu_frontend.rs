//! vhost-net with QEMU 10 as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `virtio-net-pci` NIC on a vhost-user netdev, guest memory in a shared memfd, and no guest
//! OS: the NIC's iPXE option ROM drives the device. It does DHCP against a real dnsmasq on
//! the TAP inside the test's namespace, which also serves the boot file over TFTP. dnsmasq's
//! log proves both directions of the datapath: its DHCPOFFER answers iPXE's DISCOVER (guest
//! → TAP), its DHCPACK answers the REQUEST iPXE sends only after the OFFER reached it (TAP →
//! guest), and the TFTP transfer to the leased address shows iPXE took the ACK and finished
//! DHCP.
//!
//! QEMU sends SET_VRING_ENABLE before SET_FEATURES, which `vhost` 0.18 refuses by dropping
//! the connection; without the daemon's relay putting it after SET_FEATURES this test fails
//! within seconds.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The guest NIC's MAC address (QEMU's `mac=`).
const GUEST_MAC: &str = "52:54:00:c0:b1:4d";
/// The addresses dnsmasq hands out (the TAP has [`HOST_IP`]/24).
const DHCP_RANGE: &str = "10.77.0.50,10.77.0.99,255.255.255.0,1h";
/// The boot file named in the DHCP answer and served over TFTP.
const BOOT_FILE: &str = "cowbird.ipxe";

/// Starts dnsmasq inside `ns` as a DHCP and TFTP server on `tap` only (no DNS), with its
/// configuration, pid file, lease file and TFTP root in `dir`, logging to `dir/dnsmasq.log`.
fn start_dnsmasq(ns: &NetNs, dir: &Path, tap: &str) -> Proc {
    let tftp_root = dir.join("tftp");
    std::fs::create_dir_all(&tftp_root).unwrap();
    // iPXE fetches the script and runs it; its content does not matter to the test.
    std::fs::write(tftp_root.join(BOOT_FILE), "#!ipxe\necho cowbird\n").unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "dnsmasq"])
        .args(["--no-daemon", "--log-dhcp", "--log-facility=-"])
        // Nothing from /etc: no configuration file, no hosts, no resolv.conf.
        .args(["--conf-file=/dev/null", "--no-hosts", "--no-resolv"])
        .args([
            "--port=0",
            &format!("--interface={tap}"),
            "--bind-interfaces",
        ])
        .arg(format!("--dhcp-range={DHCP_RANGE}"))
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.join("dnsmasq.leases").display()
        ))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .args(["--enable-tftp", &format!("--dhcp-boot={BOOT_FILE}")])
        .arg(format!("--tftp-root={}", tftp_root.display()));
    let mut proc = Proc::spawn("dnsmasq", cmd, dir.join("dnsmasq.log"));
    proc.wait_for_log("DHCP, IP range", Duration::from_secs(20));
    proc
}

fn start_qemu(dir: &Path, socket: &Path) -> Proc {
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
    .args([
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"),
    ])
    .args(["-boot", "n"]);
    Proc::spawn("qemu-system-x86_64", cmd, dir.join("qemu.log"))
}

/// The address in dnsmasq's first `DHCP<what>(tap) ADDRESS GUEST_MAC` line, if any.
fn dhcp_address(log: &str, what: &str) -> Option<String> {
    let tag = format!("{what}(");
    log.lines()
        .filter(|l| l.contains(&tag) && l.contains(GUEST_MAC))
        .find_map(|l| {
            let rest = &l[l.find(&tag)?..];
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words[..] {
                [_, addr, mac, ..] if mac == GUEST_MAC => Some(addr.to_owned()),
                _ => None,
            }
        })
}

#[test]
fn qemu_negotiates_and_ipxe_does_dhcp_against_dnsmasq() {
    require_environment();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("dnsmasq", "dnsmasq-base");
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let mut daemon = Daemon::start(&ns, dir.path(), &[]);
    let mut dnsmasq = start_dnsmasq(&ns, dir.path(), &daemon.tap);
    let mut qemu = start_qemu(dir.path(), &daemon.socket);

    let deadline = Instant::now() + Duration::from_secs(180);
    let (offered, acked, tftp) = loop {
        let log = daemon.proc.log();
        let dhcp_log = dnsmasq.log();
        assert!(
            !log.contains("connection failed") && !log.contains("frontend disconnected"),
            "the daemon lost QEMU:\n{log}\nQEMU:\n{}",
            qemu.log()
        );
        if let Some(status) = qemu.try_wait() {
            panic!("QEMU exited with {status}:\n{}\ndaemon:\n{log}", qemu.log());
        }
        if let Some(status) = dnsmasq.try_wait() {
            panic!("dnsmasq exited with {status}:\n{dhcp_log}");
        }
        let offered = dhcp_address(&dhcp_log, "DHCPOFFER");
        let acked = dhcp_address(&dhcp_log, "DHCPACK");
        let tftp = dhcp_log
            .lines()
            .find(|l| l.contains("dnsmasq-tftp") && l.contains(" sent ") && l.contains(BOOT_FILE))
            .map(str::to_owned);
        if let (Some(o), Some(a), Some(t)) = (&offered, &acked, &tftp) {
            break (o.clone(), a.clone(), t.clone());
        }
        assert!(
            Instant::now() < deadline,
            "iPXE did not finish DHCP and fetch its boot file:\ndnsmasq:\n{dhcp_log}\n\
             daemon:\n{log}\nQEMU:\n{}",
            qemu.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // iPXE requested what it was offered (the OFFER reached it), got the ACK and used the
    // leased address for TFTP (the ACK reached it).
    assert_eq!(offered, acked, "{}", dnsmasq.log());
    assert!(
        tftp.ends_with(&format!(" to {acked}")),
        "TFTP went elsewhere: {tftp}"
    );

    drop(qemu);
    drop(dnsmasq);
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
    // DISCOVER, REQUEST and the TFTP read and acks out; OFFER, ACK and TFTP data in.
    let counters = pair_counters(&log);
    assert!(
        matches!(counters[..], [(0, tx, rx)] if tx >= 3 && rx >= 3),
        "{counters:?}\n{log}"
    );
}
