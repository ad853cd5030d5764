//! The VMM end to end: the test guest (tests/guest) boots under `vmm` with disks served by
//! `vhost-blk` and by `qemu-storage-daemon`; the host then checks what the guest wrote.
//!
//! Needs /dev/kvm, qemu-img and qemu-storage-daemon (scripts/install-deps.sh); the guest
//! kernel is built on first use by tests/guest/build.sh (cached).

use std::fs;
use std::path::Path;
use std::time::Duration;

use cowbird_tests::netns::NetNs;
use cowbird_tests::stack::{guest, require_kvm, run_vmm_raw, Backend, Boot};
use cowbird_tests::{qemu_check, qemu_img, wipe_guest_range_in_place};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;

fn assert_blk_step_landed(disk: &[u8]) {
    assert!(
        disk[MIB..2 * MIB] == guest().blk_step_data()[..],
        "the guest's write is not at [1 MiB, 2 MiB) of the image"
    );
}

#[test]
fn boots_two_vcpus_to_userspace_and_powers_off() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut boot = Boot::steps("cpus").args(&["--cpus", "2"]);
    boot.kernel_args = "cowbird.cpus=2";
    let run = boot.run(dir.path(), BOOT_TIMEOUT);
    run.expect_marker("COWBIRD-CPUS-OK");
    run.expect_clean_poweroff();
    eprintln!(
        "boot to userspace: {:.2} s of guest uptime; whole run {:.1} s",
        run.userspace_uptime().unwrap_or(f64::NAN),
        run.elapsed.as_secs_f64()
    );
}

#[test]
fn qcow2_disk_with_backing_file_served_by_vhost_blk() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    let mut base_data = vec![0u8; 64 * MIB];
    base_data[2 * MIB..5 * MIB].fill(0x5a);
    fs::write(&base, &base_data).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let mut backend = Backend::vhost_blk(
        dir.path(),
        "blk",
        &overlay,
        &["--format", "qcow2", "--num-queues", "2"],
    );
    let socket = format!("socket={},num_queues=2", backend.socket.display());
    let run = Boot::steps("blk,discard,rebind,blk")
        .args(&["--cpus", "2", "--disk", &socket])
        .run(dir.path(), BOOT_TIMEOUT);
    run.expect_marker("COWBIRD-BLK-OK");
    run.expect_marker("COWBIRD-DISCARD-OK");
    run.expect_marker("COWBIRD-REBIND-OK");
    assert_eq!(
        run.serial.matches("COWBIRD-BLK-OK").count(),
        2,
        "{}",
        run.serial
    );
    run.expect_clean_poweroff();
    assert!(
        backend.stop(),
        "vhost-blk did not exit cleanly:\n{}",
        backend.log()
    );

    let (code, report) = qemu_check(&overlay);
    assert_eq!(code, 0, "qemu-img check:\n{report}");
    let raw = dir.path().join("flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let disk = fs::read(&raw).unwrap();
    assert_blk_step_landed(&disk);
    // A guest's discard over a backing file leaves zeros, as QEMU's qcow2 driver does, not
    // the backing file's data.
    assert!(
        disk[2 * MIB..4 * MIB].iter().all(|&b| b == 0),
        "the discarded range does not read as zeros"
    );
    assert!(
        disk[4 * MIB..5 * MIB].iter().all(|&b| b == 0x5a),
        "backing data lost"
    );
    assert!(
        fs::read(&base).unwrap()[MIB..2 * MIB]
            .iter()
            .all(|&b| b == 0),
        "backing file written"
    );
}

#[test]
fn raw_disk_served_by_qemu_storage_daemon_with_a_bzimage_kernel() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img(&["create", "-f", "raw", image.to_str().unwrap(), "64M"]);
    let mut qsd = Backend::qemu_storage_daemon(dir.path(), "qsd", &image, "raw");
    let socket = format!("socket={}", qsd.socket.display());
    let mut boot = Boot::steps("blk").args(&["--disk", &socket]);
    boot.kernel = &guest().bzimage;
    let run = boot.run(dir.path(), BOOT_TIMEOUT);
    run.expect_marker("COWBIRD-BLK-OK");
    run.expect_clean_poweroff();
    assert!(
        qsd.stop(),
        "qemu-storage-daemon did not exit cleanly:\n{}",
        qsd.log()
    );
    assert_blk_step_landed(&fs::read(&image).unwrap());
}

#[test]
fn vhost_blk_killed_and_restarted_while_the_guest_is_idle() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img(&["create", "-f", "raw", image.to_str().unwrap(), "64M"]);
    let mut first = Backend::vhost_blk(dir.path(), "blk", &image, &["--format", "raw"]);
    let socket = first.socket.clone();
    let disk = format!("socket={}", socket.display());
    let mut boot = Boot::steps("blk,pause,blk").args(&["--disk", &disk]);
    boot.kernel_args = "cowbird.pause=15";
    let run = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        first.kill();
        // Wipe what the first step wrote: only the second one can put it back.
        wipe_guest_range_in_place(&image, "raw", MIB as u64, MIB as u64);
        Backend::vhost_blk(dir.path(), "blk", &image, &["--format", "raw"])
    });
    let (run, mut second) = run;
    run.expect_clean_poweroff();
    assert_eq!(
        run.serial.matches("COWBIRD-BLK-OK").count(),
        2,
        "{}",
        run.serial
    );
    assert!(run.stderr.contains("backend reconnected"), "{}", run.stderr);
    assert!(
        second.log().contains("frontend connected"),
        "{}",
        second.log()
    );
    assert!(
        second.stop(),
        "vhost-blk did not exit cleanly:\n{}",
        second.log()
    );
    assert_blk_step_landed(&fs::read(&image).unwrap());
}

/// The NIC uses one of the two pairs vhost-net serves (its control queue is the backend's
/// last queue).
#[test]
fn guest_pings_the_host_through_vhost_net() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let netns = NetNs::new("vmnet");
    let two_pairs = ["--num-queue-pairs", "2"];
    let mut backend = Backend::vhost_net(dir.path(), &netns, "cbtap0", "10.77.0.1/24", &two_pairs);
    let net = format!("socket={}", backend.socket.display());
    let mut boot = Boot::steps("net").args(&["--net", &net]);
    boot.kernel_args = "cowbird.ip=10.77.0.2/24 cowbird.peer=10.77.0.1";
    let run = boot.run(dir.path(), BOOT_TIMEOUT);
    run.expect_marker("COWBIRD-NET-OK");
    run.expect_clean_poweroff();
    assert!(
        backend.stop(),
        "vhost-net did not exit cleanly:\n{}",
        backend.log()
    );
}

/// One request/response on the VMM's API socket.
fn api(socket: &Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("API socket");
    writeln!(stream, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad API response {line:?}: {e}"))
}

/// Adds `pages` 2 MiB huge pages to the host's pool for as long as it lives.
struct HugePages {
    before: u64,
}

impl HugePages {
    const KNOB: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve(pages: u64) -> HugePages {
        let before: u64 = fs::read_to_string(Self::KNOB)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        fs::write(Self::KNOB, (before + pages).to_string()).unwrap_or_else(|e| {
            panic!("cannot add huge pages via {} (needs root): {e}", Self::KNOB)
        });
        HugePages { before }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = fs::write(Self::KNOB, self.before.to_string());
    }
}

/// The control socket, on a VM whose RAM is huge pages.
#[test]
fn api_socket_pauses_resumes_counts_and_shuts_down() {
    require_kvm();
    let _pages = HugePages::reserve(128);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let api_socket = socket.to_str().unwrap();
    let mut boot =
        Boot::steps("pause").args(&["--cpus", "2", "--hugepages", "--api-socket", api_socket]);
    boot.kernel_args = "cowbird.pause=600";
    let (run, ()) = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        let info = api(&socket, r#"{"command":"info"}"#);
        assert_eq!(
            (info["ok"].as_bool(), info["state"].as_str()),
            (Some(true), Some("running")),
            "{info}"
        );
        assert_eq!(info["cpus"], 2);
        let running = api(&socket, r#"{"command":"counters"}"#)["vcpu_exits"].clone();
        assert_eq!(running.as_array().map(Vec::len), Some(2), "{running}");
        assert!(running[0].as_u64().unwrap() > 0);

        assert_eq!(api(&socket, r#"{"command":"pause"}"#)["state"], "paused");
        let first = api(&socket, r#"{"command":"counters"}"#)["vcpu_exits"].clone();
        std::thread::sleep(Duration::from_secs(1));
        let second = api(&socket, r#"{"command":"counters"}"#)["vcpu_exits"].clone();
        assert_eq!(first, second, "vCPUs ran while paused");
        assert_eq!(api(&socket, r#"{"command":"info"}"#)["state"], "paused");
        assert_eq!(api(&socket, r#"{"command":"resume"}"#)["state"], "running");

        let bad = api(&socket, r#"{"command":"explode"}"#);
        assert_eq!(bad["ok"], false);
        assert!(
            bad["error"].as_str().unwrap().contains("unknown variant"),
            "{bad}"
        );
        assert_eq!(api(&socket, r#"{"command":"shutdown"}"#)["ok"], true);
    });
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("shut down through the API socket"),
        "{}",
        run.stderr
    );
    assert!(!socket.exists(), "API socket left behind");
}

/// A minimal ELF "kernel" with a PVH entry note whose first instruction is `ud2`: with no
/// IDT, the #UD escalates to a triple fault.
fn triple_faulting_kernel() -> Vec<u8> {
    const ENTRY: u64 = 0x10_0000;
    const CODE_OFFSET: usize = 0x1000;
    let code = [0x0f, 0x0b]; // ud2
    let mut note = Vec::new();
    for word in [4u32, 4, 18] {
        note.extend_from_slice(&word.to_le_bytes()); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
    let note_offset = 64 + 2 * 56;
    let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
    elf.resize(16, 0);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    for quad in [ENTRY, 64, 0] {
        elf.extend_from_slice(&quad.to_le_bytes()); // entry, phoff, shoff
    }
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 2, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize...
    }
    let phdr = |kind: u32, flags: u32, offset: usize, addr: u64, len: usize, align: u64| {
        let mut p = Vec::new();
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        for quad in [offset as u64, addr, addr, len as u64, len as u64, align] {
            p.extend_from_slice(&quad.to_le_bytes());
        }
        p
    };
    elf.extend(phdr(1, 5, CODE_OFFSET, ENTRY, code.len(), 0x1000)); // PT_LOAD
    elf.extend(phdr(4, 4, note_offset, 0, note.len(), 4)); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.resize(CODE_OFFSET, 0);
    elf.extend_from_slice(&code);
    elf
}

#[test]
fn a_triple_fault_ends_the_vmm_with_status_3_and_a_register_dump() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("crash.elf");
    fs::write(&kernel, triple_faulting_kernel()).unwrap();
    let args: Vec<String> = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--serial",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = run_vmm_raw(
        &args,
        &dir.path().join("serial.log"),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr.contains("guest crashed: triple fault on vCPU 0"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rip=0x0000000000100000"),
        "{}",
        run.stderr
    );
}

fn one_line_error(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let run = run_vmm_raw(&args, &dir.join("serial.log"), Duration::from_secs(30));
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got:\n{}",
        run.stderr
    );
    (run.code, lines[0].to_owned())
}

#[test]
fn bad_kernel_and_missing_socket_give_one_clear_error() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (code, line) = one_line_error(&["--kernel", "/nonexistent/vmlinux"], dir.path());
    assert_eq!(code, Some(1));
    assert_eq!(
        line,
        "vmm: cannot read /nonexistent/vmlinux: No such file or directory (os error 2)"
    );

    let not_a_kernel = dir.path().join("junk");
    fs::write(&not_a_kernel, vec![0u8; 4096]).unwrap();
    let (code, line) = one_line_error(&["--kernel", not_a_kernel.to_str().unwrap()], dir.path());
    assert_eq!(code, Some(1));
    assert!(
        line.contains("is not a bootable x86_64 Linux kernel"),
        "{line}"
    );

    let socket = dir.path().join("nobody.sock");
    let disk = format!("socket={}", socket.display());
    let kernel = guest().vmlinux.to_str().unwrap().to_owned();
    let (code, line) = one_line_error(&["--kernel", &kernel, "--disk", &disk], dir.path());
    assert_eq!(code, Some(1));
    assert_eq!(
        line,
        format!(
            "vmm: cannot connect to vhost-user backend at {}: No such file or directory (os error 2)",
            socket.display()
        )
    );
}

/// SIGUSR1 dumps every vCPU's registers and the VM keeps running; SIGTERM stops it with
/// exit status 0.
#[test]
fn sigusr1_dumps_registers_and_sigterm_stops_the_vm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut boot = Boot::steps("pause").args(&["--cpus", "2"]);
    boot.kernel_args = "cowbird.pause=600";
    // The VMM is the only process whose command line names this test's serial log.
    let pattern = format!("file={}", dir.path().join("serial.log").display());
    let signal = |name: &str| {
        let sent = std::process::Command::new("pkill")
            .args([name, "-f", &pattern])
            .status()
            .unwrap();
        assert!(sent.success(), "no vmm to send {name} to");
    };
    let (run, ()) = boot.run_with_pause(dir.path(), BOOT_TIMEOUT, || {
        signal("-USR1");
        std::thread::sleep(Duration::from_secs(2));
        signal("-TERM");
    });
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for cpu in 0..2 {
        assert!(
            run.stderr.contains(&format!("vCPU {cpu} registers:")),
            "{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains("terminating on SIGTERM"),
        "{}",
        run.stderr
    );
}
