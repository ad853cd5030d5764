//! Runs the `vmm` binary without booting anything: a missing kernel is a runtime error
//! (status 1); option errors and cross-option errors are usage errors (status 2) with one
//! clear message. Boots are tested in tests/tests/vmm_guest.rs.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("failed to run the vmm binary")
}

#[test]
fn missing_kernel_is_one_runtime_error() {
    let out = run(&[
        "--kernel",
        "vmlinux",
        "--memory",
        "1G",
        "--disk",
        "socket=/tmp/cowbird-test-blk.sock",
        "--net",
        "tap=tap0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vmm: cannot read vmlinux: No such file or directory (os error 2)\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_option_is_a_usage_error() {
    let out = run(&["--kernel", "vmlinux", "--disk", "socket=/a,path=/b"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'socket' and 'path' cannot be used together"),
        "{stderr}"
    );
}

#[test]
fn conflicting_options_are_a_usage_error() {
    let out = run(&[
        "--kernel",
        "vmlinux",
        "--disk",
        "socket=/tmp/x.sock",
        "--api-socket",
        "/tmp/x.sock",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vmm: socket '/tmp/x.sock' is used by both --api-socket and --disk #1\n"
    );
}
