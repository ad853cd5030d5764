//! Runs the `vhost-net` binary: valid arguments reach the honest "not implemented" exit, bad
//! ones are refused by the command-line parser with a message naming the value.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-net"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("failed to run the vhost-net binary")
}

#[test]
fn valid_arguments_exit_1_saying_the_datapath_is_missing() {
    let out = run(&["--socket", "/tmp/cowbird-test.sock", "--tap", "tap0"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vhost-net: the packet datapath is not implemented yet (see issue 6)\n"
    );
    assert!(out.stdout.is_empty());
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
    assert!(!stderr.contains("not implemented"), "{stderr}");
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
