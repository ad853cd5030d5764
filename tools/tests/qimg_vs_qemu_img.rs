//! qimg and qemu-img run side by side on the same images: same stdout, same exit codes.

use std::path::Path;
use std::process::Command;

/// (exit code, stdout) of a tool run in `dir`.
fn run(dir: &Path, tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}; run scripts/install-deps.sh"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn qimg(dir: &Path, args: &[&str]) -> (i32, String) {
    run(dir, env!("CARGO_BIN_EXE_qimg"), args)
}

fn qemu(dir: &Path, args: &[&str]) -> (i32, String) {
    run(dir, "qemu-img", args)
}

/// Both tools give the same exit code and stdout.
fn same(dir: &Path, args: &[&str]) -> String {
    let ours = qimg(dir, args);
    let theirs = qemu(dir, args);
    assert_eq!(ours, theirs, "qimg vs qemu-img differ for {args:?}");
    ours.1
}

fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    let (code, out) = run(dir, "qemu-io", &args);
    assert_eq!(code, 0, "qemu-io: {out}");
}

#[test]
fn create_prints_the_same_line_and_makes_an_equivalent_image() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "X", "64M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            "X",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,lazy_refcounts=on",
            "X",
            "3M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,refcount_bits=1",
            "X",
            "5G",
        ],
        &["create", "-f", "raw", "X", "1M"],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours = format!("ours{i}.img");
        let theirs = format!("theirs{i}.img");
        let with = |name: &str| -> Vec<String> {
            case.iter()
                .map(|a| {
                    if *a == "X" {
                        name.to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect()
        };
        let a: Vec<String> = with(&ours);
        let b: Vec<String> = with(&theirs);
        let (c1, o1) = qimg(d.path(), &a.iter().map(String::as_str).collect::<Vec<_>>());
        let (c2, o2) = qemu(d.path(), &b.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            (c1, o1.replace(&ours, "X")),
            (c2, o2.replace(&theirs, "X")),
            "{case:?}"
        );
        // The images themselves: qemu-img check is clean and info agrees on everything but
        // the file name and on-disk sizes.
        if case.contains(&"qcow2") {
            assert_eq!(qemu(d.path(), &["check", &ours]).0, 0);
        }
        let strip = |s: String, n: &str| -> String {
            s.replace(n, "X")
                .lines()
                .filter(|l| !l.contains("disk size") && !l.contains("file length"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(qemu(d.path(), &["info", &ours]).1, &ours),
            strip(qemu(d.path(), &["info", &theirs]).1, &theirs)
        );
    }
}

#[test]
fn check_and_info_match_on_qemu_written_images() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
    qemu_io(
        p,
        "a.qcow2",
        &[
            "write -P 1 0 100k",
            "write -c -P 2 1M 64k",
            "write -z 2M 64k",
        ],
    );
    qemu(
        p,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for img in ["a.qcow2", "b.qcow2"] {
        same(p, &["check", img]);
        same(p, &["check", "--output=json", img]);
        same(p, &["info", img]);
    }
    same(p, &["info", "r.raw"]);
    assert_eq!(same(p, &["check", "r.raw"]), "");
    assert_eq!(qimg(p, &["check", "r.raw"]).0, 63);
}

#[test]
fn check_reports_and_repairs_a_dirty_image_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "a.qcow2",
            "4M",
        ],
    );
    let _ = run(
        p,
        "qemu-io",
        &["-c", "write -P 3 0 200k", "-c", "abort", "a.qcow2"],
    );
    std::fs::copy(p.join("a.qcow2"), p.join("b.qcow2")).unwrap();
    same(p, &["check", "--output=json", "a.qcow2"]);
    assert_eq!(
        qimg(p, &["check", "a.qcow2"]).0,
        2,
        "stale refcounts are corruptions"
    );
    assert_eq!(qimg(p, &["check", "-r", "all", "a.qcow2"]).0, 0);
    assert_eq!(
        qemu(p, &["check", "a.qcow2"]).0,
        0,
        "qemu-img agrees the repair worked"
    );
    assert_eq!(
        qemu(p, &["compare", "a.qcow2", "b.qcow2"]).0,
        0,
        "repair lost no data"
    );
}

#[test]
fn convert_roundtrips_are_identical_for_qemu_img_compare() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu(p, &["create", "-q", "-f", "qcow2", "src.qcow2", "32M"]);
    qemu_io(
        p,
        "src.qcow2",
        &[
            "write -P 7 0 3M",
            "write -P 9 10M 100k",
            "write -c -P 4 20M 128k",
            "write -z 24M 1M",
        ],
    );
    for (args, out) in [
        (vec!["-O", "raw"], "o.raw"),
        (vec!["-O", "qcow2"], "o.qcow2"),
        (vec!["-O", "qcow2", "-c"], "oc.qcow2"),
        (
            vec!["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            "oz.qcow2",
        ),
        (vec!["-O", "qcow2", "-o", "cluster_size=4096"], "o4k.qcow2"),
    ] {
        let mut a = vec!["convert"];
        a.extend(args);
        a.extend(["src.qcow2", out]);
        assert_eq!(qimg(p, &a).0, 0, "{a:?}");
        assert_eq!(qemu(p, &["compare", "src.qcow2", out]).0, 0, "{a:?}");
        if out.ends_with("qcow2") {
            assert_eq!(qemu(p, &["check", out]).0, 0, "{a:?}");
        }
    }
    // Several sources are concatenated.
    assert_eq!(
        qimg(p, &["convert", "-O", "raw", "o.raw", "o.raw", "two.raw"]).0,
        0
    );
    assert_eq!(
        std::fs::metadata(p.join("two.raw")).unwrap().len(),
        64 << 20
    );
}

#[test]
fn compare_exit_codes_match() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu(p, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu(p, &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
    qemu(p, &["create", "-q", "-f", "qcow2", "c.qcow2", "5M"]);
    same(p, &["compare", "a.qcow2", "b.qcow2"]);
    same(p, &["compare", "a.qcow2", "c.qcow2"]);
    same(p, &["compare", "-s", "a.qcow2", "c.qcow2"]);
    qemu_io(p, "b.qcow2", &["write -P 1 12345 1"]);
    same(p, &["compare", "a.qcow2", "b.qcow2"]);
    assert_eq!(qimg(p, &["compare", "a.qcow2", "missing.qcow2"]).0, 2);
}
