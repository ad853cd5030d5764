//! QEMU 10 as the frontend: `qemu-system-x86_64 -accel tcg` with a `vhost-user-blk-pci`
//! device on our socket, driven by two guests. SeaBIOS's virtio-blk driver boots a 512-byte
//! boot sector from the disk (a read through the daemon), which reads 8 sectors with INT 13h,
//! inverts them, writes them 15 sectors further on and exits QEMU through `isa-debug-exit`.
//! The Linux test guest (tests/guest) writes and reads back a MiB, makes and checks a file
//! system, changes the write cache mode, resets the device, discards, and carries on across
//! a restart of the daemon (QEMU reconnecting). The host then checks the image.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use cowbird_tests::stack::{guest, wait_for_console, wait_timeout};
use cowbird_tests::{assert_qemu_clean, qemu_img, qemu_raw, wipe_guest_range_in_place};

/// `tests/data/qemu-boot-sector.S`, assembled (the rest of the sector is zero up to the
/// 0x55 0xaa signature).
const BOOT_CODE: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, //
    0xfb, 0x88, 0x16, 0x69, 0x7c, 0x66, 0xc7, 0x06, 0x74, 0x7c, 0x01, 0x00, //
    0x00, 0x00, 0xb8, 0x00, 0x42, 0x8a, 0x16, 0x69, 0x7c, 0xbe, 0x6c, 0x7c, //
    0xcd, 0x13, 0x72, 0x29, 0xbf, 0x00, 0x80, 0xb9, 0x00, 0x10, 0xf6, 0x15, //
    0x47, 0xe2, 0xfb, 0x66, 0xc7, 0x06, 0x74, 0x7c, 0x10, 0x00, 0x00, 0x00, //
    0xb8, 0x00, 0x43, 0x8a, 0x16, 0x69, 0x7c, 0xbe, 0x6c, 0x7c, 0xcd, 0x13, //
    0x72, 0x07, 0xbe, 0x7c, 0x7c, 0xb3, 0x10, 0xeb, 0x05, 0xbe, 0x8a, 0x7c, //
    0xb3, 0x11, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, //
    0xf8, 0x88, 0xd8, 0xe6, 0xf4, 0xfa, 0xf4, 0xeb, 0xfc, 0x00, 0x66, 0x90, //
    0x10, 0x00, 0x08, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x56, 0x48, 0x4f, 0x53, 0x54, 0x42, 0x4c, 0x4b, //
    0x2d, 0x4f, 0x4b, 0x0d, 0x0a, 0x00, 0x56, 0x48, 0x4f, 0x53, 0x54, 0x42, //
    0x4c, 0x4b, 0x2d, 0x46, 0x41, 0x49, 0x4c, 0x0d, 0x0a,
];

/// Where the guest writes the sectors it read, inverted (sectors 16..24).
const GUEST_WRITE: std::ops::Range<usize> = 16 * 512..24 * 512;

/// `isa-debug-exit` turns the guest's success code 0x10 into this exit status.
const QEMU_SUCCESS: i32 = (0x10 << 1) | 1;

fn boot_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..BOOT_CODE.len()].copy_from_slice(BOOT_CODE);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// QEMU (`-accel tcg`, 128 MiB of memfd memory the daemon maps, no reboot: a reset ends it)
/// with its vhost-user-blk device on `socket` (`chardev` adds options to QEMU's socket
/// chardev) and the serial console in `dir/serial.log`; the caller adds the guest.
fn qemu_command(dir: &Path, socket: &Path, queues: u32, chardev: &str) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "128", "-display", "none"])
        .args(["-nodefaults", "-no-reboot"])
        .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}{chardev}", socket.display()))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=blk0,num-queues={queues},bootindex=1"
        ))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("serial.log").display()));
    qemu
}

/// Starts `qemu`.
fn spawn(mut qemu: Command) -> Child {
    qemu.spawn().unwrap_or_else(|e| {
        panic!("cannot run qemu-system-x86_64 (install the qemu-system-x86 package): {e}")
    })
}

/// Starts QEMU booting SeaBIOS from its vhost-user-blk device on `socket`: connecting to the
/// daemon, or with `listen` creating the socket and waiting for the daemon to connect
/// (`server=on`).
fn spawn_qemu(dir: &Path, socket: &Path, queues: u32, listen: bool) -> Child {
    let chardev = if listen { ",server=on,wait=off" } else { "" };
    let mut qemu = qemu_command(dir, socket, queues, chardev);
    qemu.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    spawn(qemu)
}

/// Waits (at most 120 s) for QEMU to exit; returns its exit code and serial output.
fn wait_qemu(dir: &Path, qemu: &mut Child) -> (Option<i32>, String) {
    let status = wait_timeout(qemu, Duration::from_secs(120));
    let serial = dir.join("serial.log");
    (status, std::fs::read_to_string(&serial).unwrap_or_default())
}

/// An 8 MiB disk in `format` holding the boot sector and, after it, the sectors the guest
/// inverts; returns the image and its initial contents.
fn boot_image(dir: &Path, format: &str) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("contents.raw");
    let mut contents = vec![0u8; 8 << 20];
    contents[..512].copy_from_slice(&boot_sector());
    contents[512..512 + 4096].copy_from_slice(&pattern(77, 4096));
    std::fs::write(&raw, &contents).unwrap();
    if format == "raw" {
        return (raw, contents);
    }
    let img = dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    (img, contents)
}

/// Checks that the image holds what the guest wrote, and nothing else changed.
fn check_guest_wrote(img: &Path, format: &str, contents: &[u8]) {
    let after = qemu_raw(img);
    let inverted: Vec<u8> = contents[512..512 + 4096].iter().map(|b| !b).collect();
    assert!(
        after[GUEST_WRITE] == inverted[..],
        "the guest's write is not in the image"
    );
    assert!(
        after[..512 + 4096] == contents[..512 + 4096],
        "the guest's read sectors changed"
    );
    if format == "qcow2" {
        assert_qemu_clean(img);
    }
}

fn qemu_boots_reads_and_writes(format: &str, queues: u32, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (img, contents) = boot_image(dir.path(), format);
    let queue_arg = queues.to_string();
    let mut args = vec!["--format", format, "--num-queues", &queue_arg];
    args.extend(extra);
    let mut d = Daemon::start(dir.path(), &img, &args);
    let mut qemu = spawn_qemu(dir.path(), &d.socket, queues, false);
    let (code, serial) = wait_qemu(dir.path(), &mut qemu);
    assert!(
        code == Some(QEMU_SUCCESS) && serial.contains("VHOSTBLK-OK"),
        "QEMU exit code {code:?}, serial:\n{serial}\ndaemon:\n{}",
        d.log()
    );
    // QEMU is gone; the daemon serves on.
    assert!(d.running(), "daemon exited with QEMU:\n{}", d.log());
    d.stop();
    if extra.contains(&"--pin-memory") {
        assert!(d.log().contains("pinned"), "{}", d.log());
    }
    check_guest_wrote(&img, format, &contents);
}

#[test]
fn qemu_seabios_reads_and_writes_a_raw_image_from_pinned_memory() {
    qemu_boots_reads_and_writes("raw", 1, &["--pin-memory"]);
}

#[test]
fn qemu_seabios_reads_and_writes_a_qcow2_image_with_two_queues() {
    qemu_boots_reads_and_writes("qcow2", 2, &[]);
}

/// `--client`: QEMU listens (`server=on`), the daemon connects; after QEMU exits the daemon
/// keeps trying, and serves the next QEMU on the same socket.
#[test]
fn qemu_listens_and_the_client_daemon_connects_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (img, contents) = boot_image(dir.path(), "qcow2");
    let socket = dir.path().join("vhost-blk.sock");
    let mut daemon = None;
    for round in 0..2 {
        let mut qemu = spawn_qemu(dir.path(), &socket, 1, true);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "QEMU created no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Started once, with QEMU already listening; the second QEMU finds it reconnecting.
        let d = daemon.get_or_insert_with(|| {
            Daemon::start(dir.path(), &img, &["--format", "qcow2", "--client"])
        });
        let (code, serial) = wait_qemu(dir.path(), &mut qemu);
        assert!(
            code == Some(QEMU_SUCCESS) && serial.contains("VHOSTBLK-OK"),
            "round {round}: QEMU exit code {code:?}, serial:\n{serial}\ndaemon:\n{}",
            d.log()
        );
        assert!(d.running(), "daemon exited with QEMU:\n{}", d.log());
        if round == 0 {
            // Wipe what this guest wrote: only the next one can put it back.
            let (at, len) = (GUEST_WRITE.start as u64, GUEST_WRITE.len() as u64);
            wipe_guest_range_in_place(&img, "qcow2", at, len);
        }
    }
    let mut d = daemon.unwrap();
    d.stop();
    assert!(
        d.log().contains("waiting for a frontend to listen"),
        "{}",
        d.log()
    );
    check_guest_wrote(&img, "qcow2", &contents);
}

/// The Linux test guest under QEMU (TCG, 2 vCPUs) with its disk on the daemon's socket;
/// QEMU is killed if the test ends before it.
struct LinuxGuest {
    qemu: Child,
    dir: PathBuf,
}

impl LinuxGuest {
    /// Boots with `queues` queues on `socket` (`chardev` adds options to QEMU's socket
    /// chardev) and `kernel_args` (the `cowbird.test=` steps and their settings).
    fn boot(dir: &Path, socket: &Path, queues: u32, chardev: &str, kernel_args: &str) -> Self {
        let g = guest();
        let mut qemu = qemu_command(dir, socket, queues, chardev);
        qemu.args(["-machine", "pc", "-cpu", "qemu64", "-smp", "2"])
            .args(["-bios", "/usr/share/qemu/qboot.rom"])
            .arg("-kernel")
            .arg(&g.vmlinux)
            .arg("-initrd")
            .arg(&g.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 reboot=k panic=-1 {kernel_args}"));
        LinuxGuest {
            qemu: spawn(qemu),
            dir: dir.to_owned(),
        }
    }

    /// Waits (at most 120 s) for the guest to end QEMU; returns QEMU's exit code and the
    /// guest's console.
    fn wait(&mut self) -> (Option<i32>, String) {
        wait_qemu(&self.dir, &mut self.qemu)
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// Checks that QEMU exited 0 after the guest printed each `COWBIRD-<step>-OK` the number of
/// times given.
fn assert_steps_passed(code: Option<i32>, serial: &str, steps: &[(&str, usize)], d: &Daemon) {
    for &(step, times) in steps {
        let passed = serial.matches(&format!("COWBIRD-{step}-OK")).count();
        assert!(
            passed == times,
            "COWBIRD-{step}-OK {passed} times, not {times}; QEMU exit code {code:?}, \
             serial:\n{serial}\ndaemon:\n{}",
            d.log()
        );
    }
    assert_eq!(code, Some(0), "QEMU's exit code; serial:\n{serial}");
}

/// Checks that the image holds the MiB of the guest's `blk` step and, in its first MiB, the
/// file system of its `fs` step, which `e2fsck` calls clean; returns the image's contents.
fn check_linux_guest_wrote(dir: &Path, img: &Path, format: &str) -> Vec<u8> {
    if format == "qcow2" {
        assert_qemu_clean(img);
    }
    let disk = qemu_raw(img);
    assert!(
        disk[1 << 20..2 << 20] == guest().blk_step_data()[..],
        "the guest's MiB is not at [1 MiB, 2 MiB) of the image"
    );
    let fs = dir.join("fs.ext2");
    std::fs::write(&fs, &disk[..1 << 20]).unwrap();
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&fs)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert!(
        fsck.status.success(),
        "e2fsck of the guest's file system: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    disk
}

/// The Linux guest's virtio-blk driver on the daemon through QEMU: two queues with
/// EVENT_IDX and indirect descriptors, O_DIRECT writes and reads of a MiB, an ext2 file
/// system made, filled, flushed, mounted again and checked, the write cache switched to
/// writethrough (CONFIG_WCE), the device reset (driver unbound and bound again: its rings
/// stopped and set up anew) and the MiB written and read again, 2 MiB written and
/// discarded. The host then finds what the guest wrote, zeros where it discarded, and a
/// qcow2 image `qemu-img check` calls clean.
fn qemu_linux_guest_uses_the_disk(format: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("disk.{format}"));
    qemu_img(&["create", "-q", "-f", format, img.to_str().unwrap(), "64M"]);
    let mut args = vec!["--format", format, "--num-queues", "2"];
    args.extend(extra);
    let mut d = Daemon::start(dir.path(), &img, &args);
    let steps = "cowbird.test=cpus,blk,fs,wt,rebind,blk,discard cowbird.cpus=2";
    let (code, serial) = LinuxGuest::boot(dir.path(), &d.socket, 2, "", steps).wait();
    let passed = [
        ("CPUS", 1),
        ("BLK", 2),
        ("FS", 1),
        ("WT", 1),
        ("REBIND", 1),
        ("DISCARD", 1),
    ];
    assert_steps_passed(code, &serial, &passed, &d);
    assert!(d.running(), "daemon exited with QEMU:\n{}", d.log());
    d.stop();
    let log = d.log();
    assert!(
        log.contains("guest set the write cache to writethrough"),
        "{log}"
    );
    if extra.contains(&"--pin-memory") {
        assert!(log.contains("pinned"), "{log}");
    }
    let disk = check_linux_guest_wrote(dir.path(), &img, format);
    assert!(
        disk[2 << 20..4 << 20].iter().all(|&b| b == 0),
        "the range the guest discarded does not read as zeros"
    );
}

#[test]
fn qemu_linux_guest_uses_a_raw_disk_from_pinned_memory() {
    qemu_linux_guest_uses_the_disk("raw", &["--pin-memory"]);
}

#[test]
fn qemu_linux_guest_uses_a_qcow2_disk() {
    qemu_linux_guest_uses_the_disk("qcow2", &[]);
}

/// QEMU's reconnecting chardev (`reconnect-ms`): the daemon is killed (SIGKILL) while the
/// guest is idle and started again; QEMU reconnects, sets the device up again, and the guest
/// makes its file system and writes its MiB through the new daemon.
#[test]
fn qemu_reconnects_to_a_restarted_daemon_and_the_guest_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let args = ["--format", "qcow2", "--num-queues", "2"];
    let mut d = Daemon::start(dir.path(), &img, &args);
    let steps = "cowbird.test=pause,fs,blk cowbird.pause=5";
    let mut vm = LinuxGuest::boot(dir.path(), &d.socket, 2, ",reconnect-ms=200", steps);
    let serial = dir.path().join("serial.log");
    wait_for_console(&serial, "COWBIRD-STEP pause", Duration::from_secs(120));
    d.stop_with(libc::SIGKILL);
    // Gone with the daemon: the next one's socket is the one to wait for.
    std::fs::remove_file(&d.socket).unwrap();
    let mut d = Daemon::start(dir.path(), &img, &args);
    let (code, serial) = vm.wait();
    assert_steps_passed(code, &serial, &[("PAUSE", 1), ("FS", 1), ("BLK", 1)], &d);
    assert!(
        d.log().contains("frontend connected"),
        "the guest's writes did not go through the restarted daemon:\n{}",
        d.log()
    );
    d.stop();
    check_linux_guest_wrote(dir.path(), &img, "qcow2");
}
