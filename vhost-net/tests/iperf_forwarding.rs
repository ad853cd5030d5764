//! TCP through vhost-net with a forwarding frontend: a TAP in namespace A (dpdk-testpmd's
//! `net_tap` port) ↔ testpmd forwarding ↔ its `virtio_user` port ↔ vhost-net ↔ the daemon's
//! TAP in namespace B. iperf3 runs both directions, and a transfer of pseudo-random data in
//! each direction is compared byte for byte; no TCP checksum errors in either namespace.
//!
//! - Offloads off: testpmd forwards unchanged (`io`); the frontend acks no offload, so the
//!   daemon's TAP gets no offloads and kernel-made checksums travel end to end.
//! - Offloads on: the `virtio_user` port enables TCP checksum offload and TSO on transmit and
//!   LRO on receive, so it acks CSUM, GUEST_CSUM, GUEST_TSO4/6 and HOST_TSO4/6, and the daemon
//!   sets TUN_F_CSUM|TSO4|TSO6. B → A: namespace B's kernel hands the daemon 64 KiB TCP
//!   segments with partial checksums, which reach the frontend spread over several mergeable
//!   rx buffers; testpmd's `csum` engine has the `net_tap` port segment them (TSO at 1400
//!   bytes, which with headers passes net_tap's MTU check). A → B: testpmd merges the frames
//!   from `net_tap` (GRO) and sends them with TSO (GSO vnet headers) for the daemon to write
//!   to its TAP. The test checks that frames far larger than the MTU crossed the daemon both
//!   ways. The `csum` engine rewrites MAC addresses, hence the fixed peers. This test caught
//!   the daemon publishing a packet's rx buffers one at a time: the polling PMD saw the first
//!   buffers of a 64 KiB packet alone, took a later one for a packet start and crashed.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Namespace A's address, on testpmd's `net_tap` interface.
const A_IP: &str = "10.77.0.2";
/// The `net_tap` interface's MAC address (fixed, so testpmd's `csum` engine can address it).
const A_MAC: &str = "02:00:00:00:0a:02";

struct Setup {
    a: NetNs,
    b: NetNs,
    daemon: Daemon,
    testpmd: Proc,
    dir: tempfile::TempDir,
}

fn setup(offloads: bool) -> Setup {
    require_environment();
    require_tool("iperf3", "iperf3");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (NetNs::new("net"), NetNs::new("net"));
    let mut daemon = Daemon::start(&b, dir.path(), &[]);
    let tap_a = unique("ta");
    let vdevs = [
        format!("net_tap0,iface={tap_a}"),
        format!(
            "net_virtio_user0,path={},queues=1,queue_size=256",
            daemon.socket.display()
        ),
    ];
    let mut app: Vec<String> = vec!["--forward-mode=io".into()];
    if offloads {
        let out = b.exec(&["cat", &format!("/sys/class/net/{}/address", daemon.tap)]);
        let b_mac = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // Port 0 is the net_tap port, port 1 the virtio_user port.
        let commands = [
            "port stop all",
            "port config 1 rx_offload tcp_lro on",
            "port config 1 rx_offload tcp_cksum on",
            "port config 1 tx_offload tcp_cksum on",
            "port config 1 tx_offload tcp_tso on",
            "port config 0 tx_offload ipv4_cksum on",
            "port config 0 tx_offload tcp_cksum on",
            "port config 0 tx_offload tcp_tso on",
            "csum set ip hw 0",
            "csum set tcp hw 0",
            "csum set tcp hw 1",
            "tso set 1400 0",
            "tso set 1448 1",
            "port start all",
            "set port 0 gro on",
            "set fwd csum",
        ];
        let file = dir.path().join("testpmd.cmds");
        std::fs::write(&file, commands.join("\n") + "\n").unwrap();
        app.extend([
            format!("--eth-peer=0,{A_MAC}"),
            format!("--eth-peer=1,{b_mac}"),
            format!("--cmdline-file={}", file.display()),
        ]);
    }
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    let (mut testpmd, _) = spawn_testpmd(dir.path(), Some(&a), &["--no-telemetry"], &vdevs, &app);
    let expected = if offloads {
        "TAP offloads 0x7)"
    } else {
        "TAP offloads 0x0)"
    };
    daemon.proc.wait_for_log(expected, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.has_link(&tap_a) {
        assert!(Instant::now() < deadline, "no {tap_a}:\n{}", testpmd.log());
        assert!(testpmd.try_wait().is_none(), "{}", testpmd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    for cmd in [
        vec!["ip", "link", "set", "dev", &tap_a, "address", A_MAC],
        vec!["ip", "addr", "add", &format!("{A_IP}/24"), "dev", &tap_a],
        vec!["ip", "link", "set", "dev", &tap_a, "up"],
    ] {
        let out = a.exec(&cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    a.wait_reachable(HOST_IP, Duration::from_secs(30));
    Setup {
        a,
        b,
        daemon,
        testpmd,
        dir,
    }
}

/// Bytes iperf3 (JSON output) says the receiver got.
fn received_bytes(json: &str) -> u64 {
    let at = json
        .find("\"sum_received\"")
        .unwrap_or_else(|| panic!("no sum_received in iperf3 output:\n{json}"));
    let rest = &json[at..];
    let bytes = &rest[rest.find("\"bytes\":").expect("bytes") + 8..];
    bytes
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("a byte count")
}

/// iperf3 from A to B (or B to A with `reverse`) for 2 s: the bytes received.
fn iperf3(s: &Setup, reverse: bool) -> u64 {
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns", "exec", &s.b.name, "iperf3", "-s", "-1", "-B", HOST_IP,
    ]);
    let log = s.dir.path().join(format!("iperf3-server-{reverse}.log"));
    let mut server = Proc::spawn("iperf3 server", cmd, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["timeout", "30", "iperf3", "-c", HOST_IP, "-t", "2", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = s.a.exec(&args);
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        // iperf3 -J may exit 0 after failing to connect: go by what it reports.
        if out.status.success() && json.contains("\"sum_received\"") {
            let _ = server.stop_with(libc::SIGTERM);
            return received_bytes(&json);
        }
        // The server may not listen yet.
        assert!(
            Instant::now() < deadline && json.contains("unable to connect"),
            "iperf3 -c (reverse {reverse}) failed:\n{json}\nserver:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A deterministic pseudo-random byte stream (xorshift64).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

const TRANSFER: usize = 32 << 20;

fn send_pattern(mut stream: TcpStream, seed: u64) {
    let mut pattern = Pattern(seed);
    let mut buf = vec![0u8; 64 << 10];
    let mut left = TRANSFER;
    while left > 0 {
        let n = left.min(buf.len());
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).expect("send");
        left -= n;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
}

fn check_pattern(mut stream: TcpStream, seed: u64) {
    let mut pattern = Pattern(seed);
    let (mut got, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut total = 0;
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = stream.read(&mut got).expect("receive");
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&got[..n]);
        // Compare whole 8-byte words so the pattern stays aligned.
        let whole = carry.len() / 8 * 8;
        pattern.fill(&mut want[..whole]);
        assert!(
            carry[..whole] == want[..whole],
            "data corrupted within bytes {total}..{}",
            total + whole
        );
        total += whole;
        carry.drain(..whole);
    }
    assert!(carry.is_empty(), "stream ended inside a word");
    assert_eq!(total, TRANSFER, "short transfer");
}

/// Sends [`TRANSFER`] pseudo-random bytes each way at once over one TCP connection between
/// the namespaces, checking every byte on arrival.
fn transfer_both_ways(s: &Setup) {
    let listener = s.b.run_inside(|| {
        TcpListener::bind((HOST_IP.parse::<Ipv4Addr>().unwrap(), 0)).expect("listen in B")
    });
    let port = listener.local_addr().unwrap().port();
    let a_side =
        s.a.run_inside(move || TcpStream::connect((HOST_IP, port)).expect("connect from A"));
    let (b_side, _) = listener.accept().unwrap();
    for sock in [&a_side, &b_side] {
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
    }
    let threads = [
        {
            let s = a_side.try_clone().unwrap();
            std::thread::spawn(move || send_pattern(s, 0x1234_5678_9abc_def1))
        },
        {
            let s = b_side.try_clone().unwrap();
            std::thread::spawn(move || send_pattern(s, 0x0fed_cba9_8765_4321))
        },
        std::thread::spawn(move || check_pattern(b_side, 0x1234_5678_9abc_def1)),
        std::thread::spawn(move || check_pattern(a_side, 0x0fed_cba9_8765_4321)),
    ];
    for t in threads {
        t.join().expect("transfer failed");
    }
}

/// TCP's InCsumErrors in namespace `ns`.
fn tcp_checksum_errors(ns: &NetNs) -> u64 {
    let out = ns.exec(&["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().expect("Tcp header"), tcp.next().expect("Tcp"));
    let i = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .expect("InCsumErrors");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// The daemon's TAP's [tx packets, tx bytes, rx packets, rx bytes] (tx: what namespace B's
/// kernel handed the daemon; rx: what the daemon wrote).
fn tap_counters(s: &Setup) -> [u64; 4] {
    ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"].map(|what| {
        let path = format!("/sys/class/net/{}/statistics/{what}", s.daemon.tap);
        let out = s.b.exec(&["cat", &path]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect(&path)
    })
}

fn scenario(offloads: bool) {
    let mut s = setup(offloads);
    let before = tap_counters(&s);
    let up = iperf3(&s, false);
    let middle = tap_counters(&s);
    let down = iperf3(&s, true);
    let after = tap_counters(&s);
    // Average frame sizes: A→B as the daemon wrote them, B→A as the kernel handed them over.
    let up_frame = (middle[3] - before[3]) / (middle[2] - before[2]).max(1);
    let down_frame = (after[1] - middle[1]) / (after[0] - middle[0]).max(1);
    eprintln!(
        "iperf3 A→B {up} bytes ({up_frame} bytes per frame), B→A {down} bytes ({down_frame} \
         bytes per frame) in 2 s, offloads {offloads}"
    );
    assert!(up > 1 << 20 && down > 1 << 20, "A→B {up} B→A {down}");
    if offloads {
        // TSO super-packets went through the daemon both ways (GSO vnet headers from the
        // frontend's TSO after testpmd's GRO, and from the kernel), not MTU-sized frames.
        assert!(
            up_frame > 3000 && down_frame > 3000,
            "{up_frame} / {down_frame} bytes per frame"
        );
    } else {
        assert!(
            up_frame <= 1514 && down_frame <= 1514,
            "{up_frame} / {down_frame} bytes per frame without offloads"
        );
    }
    transfer_both_ways(&s);
    assert_eq!(tcp_checksum_errors(&s.a), 0, "TCP checksum errors in A");
    assert_eq!(tcp_checksum_errors(&s.b), 0, "TCP checksum errors in B");
    s.testpmd.stop_running(libc::SIGINT);
    s.daemon.stop();
}

#[test]
fn tcp_both_ways_without_offloads() {
    scenario(false);
}

#[test]
fn tcp_both_ways_with_offloads() {
    scenario(true);
}
