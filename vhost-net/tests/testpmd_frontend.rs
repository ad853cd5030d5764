//! vhost-net with a real frontend: DPDK's testpmd `virtio_user` port in icmpecho mode on one
//! side, the TAP (with an address, inside a network namespace the test creates) on the other.
//! Pings of every size and a bounded flood must see no loss, with and without mergeable rx
//! buffers, on one and two queue pairs; the daemon survives a frontend disconnect, accepts the
//! next one, and on SIGTERM exits 0 and removes the TAP it created.

mod common;

use std::time::Duration;

use common::*;

fn scenario(frontend: Frontend, daemon_args: &[&str]) -> String {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let mut daemon = Daemon::start(&ns, dir.path(), daemon_args);
    let mut testpmd = start_testpmd(dir.path(), &daemon.socket, frontend);
    daemon
        .proc
        .wait_for_log("negotiated", Duration::from_secs(60));
    ping_all_sizes_and_flood(&ns);
    if frontend.queues > 1 {
        // Different destinations hash to different TAP queues.
        for last in 3..=20 {
            let ip = format!("10.77.0.{last}");
            ns.wait_reachable(&ip, Duration::from_secs(10));
            let (tx, rx) = ns.ping_burst(&ip, 10, &[]);
            assert_eq!(tx, rx, "ping {ip}: loss");
        }
    }
    testpmd.stop_running(libc::SIGINT);
    let log = daemon.stop();
    assert!(!ns.has_link(&daemon.tap), "the TAP outlived the daemon");
    log
}

#[test]
fn ping_and_flood_with_mergeable_rx_buffers() {
    let log = scenario(Frontend::default(), &[]);
    assert!(negotiated(&log).contains("MRG_RXBUF"), "{log}");
}

#[test]
fn ping_and_flood_without_mergeable_rx_buffers() {
    let log = scenario(
        Frontend {
            mrg_rxbuf: false,
            ..Frontend::default()
        },
        &[],
    );
    assert!(!negotiated(&log).contains("MRG_RXBUF"), "{log}");
}

/// The daemon's "negotiated ..." line.
fn negotiated(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("negotiated"))
        .unwrap_or_else(|| panic!("no negotiated line:\n{log}"))
}

#[test]
fn packed_ring_request_falls_back_to_split() {
    // RING_PACKED is not offered (virtio-queue has split rings only): the frontend uses split.
    let log = scenario(
        Frontend {
            packed_vq: true,
            ..Frontend::default()
        },
        &[],
    );
    // VIRTIO_F_RING_PACKED is bit 34, printed as "bit34" were it negotiated.
    let line = negotiated(&log);
    assert!(
        line.contains("VERSION_1") && !line.contains("bit34"),
        "{line}"
    );
}

#[test]
fn two_queue_pairs_both_carry_traffic() {
    let log = scenario(
        Frontend {
            queues: 2,
            ..Frontend::default()
        },
        &["--num-queue-pairs", "2"],
    );
    let counters = pair_counters(&log);
    assert_eq!(counters.len(), 2, "{log}");
    for (pair, tx, rx) in counters {
        assert!(
            tx > 0 && rx > 0,
            "pair {pair} idle (tx {tx}, rx {rx}):\n{log}"
        );
    }
}

#[test]
fn frontend_reconnects_and_sigterm_removes_the_tap() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let mut daemon = Daemon::start(&ns, dir.path(), &[]);
    for round in 1..=3 {
        let mut testpmd = start_testpmd(dir.path(), &daemon.socket, Frontend::default());
        ns.wait_reachable(GUEST_IP, Duration::from_secs(30));
        let (tx, rx) = ns.ping_burst(GUEST_IP, 50, &[]);
        assert_eq!((tx, rx), (50, 50), "round {round}");
        testpmd.stop_running(libc::SIGINT);
        let disconnects = || daemon.proc.log().matches("frontend disconnected").count();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while disconnects() < round {
            assert!(
                std::time::Instant::now() < deadline,
                "no disconnect seen:\n{}",
                daemon.proc.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ns.has_link(&daemon.tap), "the TAP must outlive a frontend");
    }
    let log = daemon.stop();
    assert!(log.contains("received SIGTERM"), "{log}");
    assert!(!ns.has_link(&daemon.tap), "the TAP outlived the daemon");
    assert!(!daemon.socket.exists(), "the socket file is left behind");
}

#[test]
fn client_mode_connects_to_a_listening_frontend() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let socket = dir.path().join("net.sock");
    let mut testpmd = start_testpmd(
        dir.path(),
        &socket,
        Frontend {
            server: true,
            ..Frontend::default()
        },
    );
    // testpmd creates the socket; the daemon connects to it.
    let mut daemon = Daemon::start(&ns, dir.path(), &["--client"]);
    assert_eq!(daemon.socket, socket);
    daemon
        .proc
        .wait_for_log("negotiated", Duration::from_secs(60));
    ns.wait_reachable(GUEST_IP, Duration::from_secs(30));
    let (tx, rx) = ns.ping_burst(GUEST_IP, 50, &[]);
    assert_eq!((tx, rx), (50, 50));
    testpmd.stop_running(libc::SIGINT);
    daemon.stop();
}

#[test]
fn attaches_to_an_existing_tap_and_leaves_it() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let tap = unique("vp");
    let out = ns.exec(&[
        "ip", "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = dir.path().join("p.sock");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_vhost-net"))
        .arg("--socket")
        .arg(&socket)
        .args(["--tap", &tap, "--host-ip", &format!("{HOST_IP}/24")])
        .stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut testpmd = start_testpmd(dir.path(), &socket, Frontend::default());
    ns.wait_reachable(GUEST_IP, Duration::from_secs(30));
    testpmd.stop_running(libc::SIGINT);
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(
        ns.has_link(&tap),
        "a TAP the daemon did not create must stay"
    );
    // A multi-queue request on this single-queue TAP is one clear error.
    let out = ns.exec(&[
        env!("CARGO_BIN_EXE_vhost-net"),
        "--socket",
        socket.to_str().unwrap(),
        "--tap",
        &tap,
        "--num-queue-pairs",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exists with different flags"), "{stderr}");
}
