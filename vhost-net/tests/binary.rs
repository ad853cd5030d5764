//! Runs the `vhost-net` binary: bad values are refused by the command-line parser with a
//! message naming the value, an unusable TAP with one error line.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-net"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("failed to run the vhost-net binary")
}

#[test]
fn an_interface_that_is_not_a_tap_is_one_clear_error() {
    // TUNSETIFF on an existing non-TUN interface fails: nothing is created or changed.
    let out = run(&["--socket", "/tmp/cowbird-test-lo.sock", "--tap", "lo"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // CI runs as root with /dev/net/tun: the TUNSETIFF path is the one under test.
    assert!(
        stderr.contains("cannot attach to TAP device 'lo'"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!std::path::Path::new("/tmp/cowbird-test-lo.sock").exists());
}

#[test]
fn bad_values_are_usage_errors() {
    let out = run(&[
        "--socket",
        "/tmp/cowbird-test.sock",
        "--tap",
        "tap0",
        "--mtu",
        "40",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MTU 40 is outside 68..=65535"), "{stderr}");
}

#[test]
fn help_lists_every_option() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket",
        "--tap",
        "--num-queue-pairs",
        "--queue-size",
        "--mac",
        "--mtu",
        "--host-ip",
        "--client",
    ] {
        assert!(help.contains(opt), "{opt} missing from:\n{help}");
    }
}
