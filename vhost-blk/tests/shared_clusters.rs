//! Two queues writing to the same qcow2 cluster with O_DIRECT, while the frontend goes away
//! or the daemon is told to stop. A write that finds its cluster held by a write in the other
//! queue's io_uring waits for it (with its queue locked); stopping must still complete that
//! other write rather than wait for the waiting queue.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cowbird_tests::qemu_img_create_qcow2;

/// Writes in flight on both queues, all to 4 KiB blocks of the first 64 KiB cluster.
fn writes_on_both_queues(c: &mut Client) {
    let offsets: Vec<u64> = (0..16).map(|i| i * 4096).collect();
    c.submit_writes(0, &offsets, 4096);
    c.submit_writes(1, &offsets, 4096);
}

fn start(dir: &std::path::Path) -> Daemon {
    let img = dir.join("disk.qcow2");
    qemu_img_create_qcow2(img.to_str().unwrap(), &[], "16M");
    Daemon::start(
        dir,
        &img,
        &["--format", "qcow2", "--direct", "--num-queues", "2"],
    )
}

#[test]
fn sigterm_with_both_queues_writing_one_cluster_exits() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let mut d = start(dir.path());
        let mut c = connect(&d.socket, 2, false).unwrap_or_else(|e| panic!("{e}:\n{}", d.log()));
        for _ in 0..round % 4 {
            writes_on_both_queues(&mut c);
        }
        writes_on_both_queues(&mut c);
        let started = Instant::now();
        let status = d.stop_with(libc::SIGTERM);
        assert!(status.success(), "round {round}: {status}:\n{}", d.log());
        assert!(started.elapsed() < Duration::from_secs(10), "round {round}");
        drop(c);
    }
}

#[test]
fn a_frontend_leaving_with_both_queues_writing_one_cluster_lets_the_next_one_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let socket = d.socket.clone();
    // A daemon stuck on the last connection never answers the next: the client runs in a
    // thread, and the test fails when a round takes too long.
    let (done, rounds) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for round in 0..20 {
            let mut c = connect(&socket, 2, false).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(
                c.flush(0),
                0,
                "round {round}: the new frontend is not served"
            );
            writes_on_both_queues(&mut c);
            drop(c);
            done.send(round).unwrap();
        }
    });
    for round in 0..20 {
        let got = rounds.recv_timeout(Duration::from_secs(10));
        assert_eq!(got, Ok(round), "round {round} did not finish:\n{}", d.log());
    }
    d.stop();
}
