//! The whole stack from one command (issue 8): `vmm --disk path=... --net tap=...` starts its
//! own `vhost-blk` and `vhost-net` children, restarts one that dies, and leaves no process,
//! socket or TAP behind when the guest powers off.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cowbird_tests::netns::NetNs;
use cowbird_tests::procfs;
use cowbird_tests::stack::{guest, require_kvm, wait_for_console, Boot};
use cowbird_tests::{qemu_check, qemu_img, wipe_guest_range_in_place};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: usize = 1 << 20;

/// Processes whose command line mentions `dir` (backends serving images in it).
fn processes_using(dir: &Path) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "-f", dir.to_str().unwrap()])
        .output()
        .expect("pgrep (procps)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn spawned_backends_serve_raw_and_qcow2_disks_and_a_nic_then_vanish() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&["create", "-f", "raw", raw.to_str().unwrap(), "64M"]);
    let mut base_data = vec![0u8; 64 * MIB];
    base_data[8 * MIB..9 * MIB].fill(0xa5);
    fs::write(&base, &base_data).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let netns = NetNs::new("spawn");
    let disk0 = format!("path={},format=raw", raw.display());
    let disk1 = format!("path={},format=qcow2,num_queues=2", overlay.display());
    let mut boot = Boot::steps("blk,vdb,net").args(&[
        "--cpus",
        "2",
        "--disk",
        &disk0,
        "--disk",
        &disk1,
        "--net",
        "tap=cbspawn0,ip=10.78.0.1/24",
    ]);
    boot.kernel_args = "cowbird.ip=10.78.0.2/24 cowbird.peer=10.78.0.1";
    boot.netns = Some(&netns);
    let run = boot.run(dir.path(), BOOT_TIMEOUT);
    run.expect_marker("COWBIRD-BLK-OK");
    run.expect_marker("COWBIRD-VDB-OK");
    run.expect_marker("COWBIRD-NET-OK");
    run.expect_clean_poweroff();

    // Children were told to stop and flushed: nothing left running, images clean.
    assert!(
        processes_using(dir.path()).is_empty(),
        "{:?}",
        processes_using(dir.path())
    );
    assert!(
        run.stderr.contains("[vhost-blk disk0]"),
        "backend logs are forwarded:\n{}",
        run.stderr
    );
    let (code, report) = qemu_check(&overlay);
    assert_eq!(code, 0, "{report}");
    assert!(fs::read(&raw).unwrap()[MIB..2 * MIB] == guest().blk_step_data()[..]);
    let flat = dir.path().join("flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let flat = fs::read(&flat).unwrap();
    assert!(
        flat[MIB..2 * MIB] == guest().blk_step_data()[..],
        "vdb write missing"
    );
    assert!(
        flat[8 * MIB..9 * MIB].iter().all(|&b| b == 0xa5),
        "backing data lost"
    );
    // The TAP went away with vhost-net, and the private socket directory with the VMM.
    assert!(!netns.has_link("cbspawn0"), "TAP still exists");
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("run")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "socket directory left behind: {leftovers:?}"
    );
}

#[test]
fn a_killed_vhost_blk_child_is_restarted_and_the_guest_carries_on() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", image.to_str().unwrap(), "64M"]);
    let disk = format!("path={},format=qcow2", image.display());
    let mut boot = Boot::steps("blk,pause,blk").args(&["--disk", &disk]);
    boot.kernel_args = "cowbird.pause=15";
    let (run, ()) = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        let killed = Command::new("pkill")
            .args(["-KILL", "-f", &format!("vhost-blk.*{}", image.display())])
            .status()
            .unwrap();
        assert!(killed.success(), "no vhost-blk child to kill");
        // Wipe whatever of the first step's write is in the image (the guest's `sync` does
        // not flush a raw block device, so the kill may have taken it with the child's
        // metadata): only the second step, served by the restarted child, can put it back.
        wipe_guest_range_in_place(&image, "qcow2", MIB as u64, MIB as u64);
    });
    run.expect_clean_poweroff();
    assert_eq!(
        run.serial.matches("COWBIRD-BLK-OK").count(),
        2,
        "{}",
        run.serial
    );
    assert!(run.stderr.contains("restarting it"), "{}", run.stderr);
    assert!(run.stderr.contains("backend reconnected"), "{}", run.stderr);
    assert!(processes_using(dir.path()).is_empty());
    let (code, report) = qemu_check(&image);
    assert_eq!(code, 0, "{report}");
    let flat = dir.path().join("flat.raw");
    let args = ["convert", "-O", "raw", image.to_str().unwrap()];
    qemu_img(&[&args[..], &[flat.to_str().unwrap()]].concat());
    assert!(
        fs::read(&flat).unwrap()[MIB..2 * MIB] == guest().blk_step_data()[..],
        "the guest's write after the restart is not in the image"
    );
}

/// The eventfds `child` shares with the VMM `vmm`, as "fd N" strings for messages.
fn shared_with_vmm(vmm: u32, child: u32) -> Vec<String> {
    procfs::shared_eventfds(vmm, child)
        .iter()
        .map(|f| format!("fd {}", f.fd))
        .collect()
}

/// The one `vhost-blk` child of `vmm` serving `socket_name`.
fn backend_child(vmm: u32, socket_name: &str) -> u32 {
    let found: Vec<u32> = procfs::children(vmm)
        .into_iter()
        .filter(|&c| procfs::cmdline(c).contains(socket_name))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "children of vmm serving {socket_name}: {found:?}"
    );
    found[0]
}

/// Every descriptor the VMM opened itself is close-on-exec, and a backend child it starts
/// shares no eventfd with it except its own queue's kick and call fds, which it was handed
/// over vhost-user: not the serial port's irqfd, nor any other device's, whether the child
/// was started with the VMM or restarted later (a backend holding another device's irqfd
/// could inject that device's interrupts).
#[test]
fn spawned_backends_hold_only_the_eventfds_of_their_own_queues() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for name in ["a.raw", "b.raw"] {
        let image = dir.path().join(name);
        qemu_img(&["create", "-f", "raw", image.to_str().unwrap(), "16M"]);
        args.push("--disk".to_string());
        args.push(format!("path={},format=raw", image.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut boot = Boot::steps("pause").args(&args);
    boot.kernel_args = "cowbird.pause=40";
    let serial = dir.path().join("serial.log");
    let stderr = serial.with_extension("stderr");
    // Descriptors this test process passes on to the VMM without close-on-exec (a build
    // lock, say) are the VMM's to inherit, not to fix.
    let inherited: Vec<i32> = procfs::open_fds(std::process::id())
        .iter()
        .filter(|f| !f.cloexec())
        .map(|f| f.fd)
        .collect();
    let (run, ()) = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        let pattern = format!("file={}", serial.display());
        let vmm = procfs::processes_matching(&pattern)[0];
        let leaky: Vec<_> = procfs::open_fds(vmm)
            .into_iter()
            .filter(|f| f.fd > 2 && !inherited.contains(&f.fd) && !f.cloexec())
            .collect();
        assert!(
            leaky.is_empty(),
            "VMM descriptors without O_CLOEXEC: {leaky:?}"
        );
        // One queue each, started by the guest's driver: a kick and a call eventfd.
        for socket in ["disk0.sock", "disk1.sock"] {
            let child = backend_child(vmm, socket);
            let shared = shared_with_vmm(vmm, child);
            assert_eq!(
                shared.len(),
                2,
                "{socket} backend shares with the VMM: {shared:?}"
            );
        }
        let first = backend_child(vmm, "disk0.sock");
        // SAFETY: kill(2) on a process this test's VMM started.
        assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
        wait_for_console(&stderr, "backend reconnected", Duration::from_secs(20));
        let restarted = backend_child(vmm, "disk0.sock");
        assert_ne!(restarted, first);
        let shared = shared_with_vmm(vmm, restarted);
        assert_eq!(
            shared.len(),
            2,
            "restarted backend shares with the VMM: {shared:?}"
        );
    });
    run.expect_clean_poweroff();
}

/// How often the VMM's log (with its children's lines) says `text`.
fn log_count(stderr: &Path, text: &str) -> usize {
    fs::read_to_string(stderr)
        .unwrap_or_default()
        .matches(text)
        .count()
}

/// The guest's writethrough setting outlives its backend: the `vhost-blk` child the VMM
/// restarts starts in writeback and must be told again, or a writethrough guest (which sends
/// no flushes) would lose acknowledged writes in a host crash.
#[test]
fn a_restarted_vhost_blk_child_is_told_the_guests_writethrough_setting() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img(&["create", "-f", "raw", image.to_str().unwrap(), "64M"]);
    let disk = format!("path={},format=raw", image.display());
    let mut boot = Boot::steps("wt,pause,blk").args(&["--disk", &disk]);
    boot.kernel_args = "cowbird.pause=20";
    let stderr = dir.path().join("serial.stderr");
    let told = "guest set the write cache to writethrough";
    let (run, ()) = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        assert_eq!(
            log_count(&stderr, told),
            1,
            "the first backend was told once"
        );
        let killed = Command::new("pkill")
            .args(["-KILL", "-f", &format!("vhost-blk.*{}", image.display())])
            .status()
            .unwrap();
        assert!(killed.success(), "no vhost-blk child to kill");
        wait_for_console(&stderr, "backend reconnected", Duration::from_secs(20));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log_count(&stderr, told) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            log_count(&stderr, told),
            2,
            "the restarted backend was not told:\n{}",
            fs::read_to_string(&stderr).unwrap_or_default()
        );
    });
    run.expect_marker("COWBIRD-WT-OK");
    run.expect_marker("COWBIRD-BLK-OK");
    run.expect_clean_poweroff();
}
