//! qimg and qemu-img run side by side on the same images: same stdout, same exit codes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// (exit code, stdout) of a tool run in `dir`.
fn run<S: AsRef<OsStr>>(dir: &Path, tool: &str, args: &[S]) -> (i32, String) {
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

fn qimg<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> (i32, String) {
    run(dir, env!("CARGO_BIN_EXE_qimg"), args)
}

fn qemu<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> (i32, String) {
    run(dir, "qemu-img", args)
}

/// Both tools give the same exit code, stdout and stderr (error messages included);
/// returns stdout.
fn same(dir: &Path, args: &[&str]) -> String {
    let ours = run_with_stderr(dir, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
    let theirs = run_with_stderr(dir, "qemu-img", "qemu-img", args);
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

/// Makes a qcow2 image with `tool` (`create -q -f qcow2 OPTS NAME [SIZE]`: no size when
/// `size` is empty), then has qemu-io apply `writes` to it.
fn make_qcow2(dir: &Path, tool: &str, opts: &[&str], name: &str, size: &str, writes: &[&str]) {
    let create = [&["create", "-q", "-f", "qcow2"], opts, &[name, size]].concat();
    let (code, _) = run(
        dir,
        tool,
        &create[..create.len() - usize::from(size.is_empty())],
    );
    assert_eq!(code, 0, "{tool} {create:?}");
    if !writes.is_empty() {
        qemu_io(dir, name, writes);
    }
}

/// [`make_qcow2`] with qemu-img.
fn qcow2_image(dir: &Path, opts: &[&str], name: &str, size: &str, writes: &[&str]) {
    make_qcow2(dir, "qemu-img", opts, name, size, writes);
}

/// [`qcow2_image`] over the qcow2 image `backing`.
fn qcow2_over(dir: &Path, backing: &str, name: &str, size: &str, writes: &[&str]) {
    qcow2_image(dir, &["-b", backing, "-F", "qcow2"], name, size, writes);
}

/// [`make_qcow2`] with qimg.
fn qimg_qcow2(dir: &Path, opts: &[&str], name: &str, size: &str, writes: &[&str]) {
    make_qcow2(dir, env!("CARGO_BIN_EXE_qimg"), opts, name, size, writes);
}

/// `args` with every `X` replaced by `name`.
fn with_name(args: &[&str], name: &str) -> Vec<String> {
    args.iter()
        .map(|a| if *a == "X" { name } else { a }.to_string())
        .collect()
}

/// `qemu-img info IMG` with `name` replaced by `X`, without the lines of on-disk sizes, and
/// snapshot dates masked (the two tools' snapshots may be a second apart).
fn info_sans_sizes(dir: &Path, img: &str, name: &str) -> String {
    qemu(dir, &["info", img])
        .1
        .replace(name, "X")
        .lines()
        .filter(|l| !l.contains("disk size") && !l.contains("file length"))
        .map(mask_dates)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` with every "YYYY-MM-DD hh:mm:ss" replaced by "DATE".
fn mask_dates(line: &str) -> String {
    const FORM: &[u8] = b"dddd-dd-dd dd:dd:dd";
    let bytes = line.as_bytes();
    let is_date = |at: usize| {
        bytes.get(at..at + FORM.len()).is_some_and(|w| {
            w.iter().zip(FORM).all(|(&b, &f)| match f {
                b'd' => b.is_ascii_digit(),
                f => b == f,
            })
        })
    };
    let mut out = String::new();
    let mut at = 0;
    while at < bytes.len() {
        if is_date(at) {
            out.push_str("DATE");
            at += FORM.len();
        } else {
            let c = line[at..].chars().next().expect("a char boundary");
            out.push(c);
            at += c.len_utf8();
        }
    }
    out
}

/// A 4 MiB lazy-refcounts qcow2 that qemu-io left dirty (killed with `abort` after a write).
fn make_dirty_qcow2(p: &Path, name: &str) {
    qcow2_image(p, &["-o", "lazy_refcounts=on"], name, "4M", &[]);
    let _ = run(
        p,
        "qemu-io",
        &["-c", "write -P 3 0 200k", "-c", "abort", name],
    );
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
        &["create", "-f", "qcow2", "-o", "extended_l2=on", "X", "3G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k,preallocation=metadata",
            "X",
            "3M",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours = format!("ours{i}.img");
        let theirs = format!("theirs{i}.img");
        let (c1, o1) = qimg(d.path(), &with_name(case, &ours));
        let (c2, o2) = qemu(d.path(), &with_name(case, &theirs));
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
        assert_eq!(
            info_sans_sizes(d.path(), &ours, &ours),
            info_sans_sizes(d.path(), &theirs, &theirs)
        );
        // Down to the file's length (QEMU's ends right after the L1 table's entries) and its
        // allocated blocks (QEMU writes the whole header cluster).
        assert_eq!(
            (size_of(d.path(), &ours), blocks_of(d.path(), &ours)),
            (size_of(d.path(), &theirs), blocks_of(d.path(), &theirs)),
            "{case:?}"
        );
    }
}

/// Option values QEMU's qcow2 driver refuses only once it creates the image: the
/// "Formatting" line first, then the error; a file emptied for an image that cannot be made
/// (here too large) is removed, one refused before that is left alone.
#[test]
fn create_fails_on_bad_option_values_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let cases: &[&[&str]] = &[
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=bogus",
            "X",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "compat=2", "X", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=lz4",
            "X",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "cluster_size=3k", "X", "1M"],
        &["create", "-f", "qcow2", "-o", "bogus=1", "X", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "X",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=missing/d.raw",
            "X",
            "1M",
        ],
        &[
            "create", "-f", "qcow2", "-b", "b", "-F", "bogus", "-u", "X", "1M",
        ],
        &["create", "-f", "qcow2", "X", "1E"],
        // Sizes near i64::MAX: rounded up to sectors, past the block layer's limit, past
        // i64::MAX (qimg said "The image size is too large" and let std's words out).
        &["create", "-f", "qcow2", "X", "9223372035781033984"],
        &["create", "-f", "qcow2", "X", "9223372035781034496"],
        &["create", "-f", "qcow2", "X", "9223372036854775295"],
        &["create", "-f", "qcow2", "X", "9223372036854775807"],
        &["create", "-f", "raw", "X", "9223372036854775295"],
        &["create", "-f", "raw", "X", "9223372036854775807"],
        // -o size is an int64 to QEMU: -1 is no size, and sizes within a sector of 2^64
        // round up to 0 (qimg's rounding overflowed).
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "size=18446744073709551615",
            "X",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "size=18446744073709551615",
            "X",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "size=18446744073709551614",
            "X",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "size=18446744073709551614",
            "X",
        ],
    ];
    for case in cases {
        // QEMU makes an empty image of a size that wraps to 0 (its tables placed otherwise:
        // compared by what qemu-img shows of it).
        let wraps = case.contains(&"size=18446744073709551614");
        let outcomes: Vec<_> = [
            (env!("CARGO_BIN_EXE_qimg"), "qimg"),
            ("qemu-img", "qemu-img"),
        ]
        .into_iter()
        .map(|(tool, prog)| {
            std::fs::write(p.join("X"), "old contents").unwrap();
            let outcome = run_with_stderr(p, tool, prog, case);
            let image = match wraps {
                true => Some(qemu(p, &["info", "X"]).1.into_bytes()),
                false => std::fs::read(p.join("X")).ok(),
            };
            (outcome, image)
        })
        .collect();
        assert!(outcomes[0] == outcomes[1], "{case:?}: {:?}", outcomes[0].0);
        assert_eq!(outcomes[0].0 .0 == 0, wraps, "{case:?}");
    }
}

#[test]
fn create_and_dd_round_sizes_up_to_512_bytes_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "X", "15000"],
        &["create", "-f", "raw", "X", "15000"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "X",
            "1025",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let ours = format!("ours{i}.img");
        let theirs = format!("theirs{i}.img");
        let (c1, o1) = qimg(p, &with_name(case, &ours));
        let (c2, o2) = qemu(p, &with_name(case, &theirs));
        assert_eq!(
            (c1, o1.replace(&ours, "X")),
            (c2, o2.replace(&theirs, "X")),
            "{case:?}"
        );
        assert_eq!(
            info_sans_sizes(p, &ours, &ours),
            info_sans_sizes(p, &theirs, &theirs),
            "{case:?}"
        );
        if case.contains(&"raw") {
            assert_eq!(size_of(p, &ours), size_of(p, &theirs), "{case:?}");
        } else {
            assert_eq!(qemu(p, &["check", &ours]).0, 0, "{case:?}");
        }
    }
    // The size taken from a raw backing file of 196616 bytes: whole sectors.
    std::fs::write(p.join("odd.raw"), vec![5u8; 196616]).unwrap();
    let case = ["create", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", "X"];
    let (c1, o1) = qimg(p, &with_name(&case, "ours-b.qcow2"));
    let (c2, o2) = qemu(p, &with_name(&case, "theirs-b.qcow2"));
    assert_eq!(
        (c1, o1.replace("ours-b", "X")),
        (c2, o2.replace("theirs-b", "X"))
    );
    assert_eq!(
        info_sans_sizes(p, "ours-b.qcow2", "ours-b"),
        info_sans_sizes(p, "theirs-b.qcow2", "theirs-b")
    );
    // dd into a qcow2 image of 15000 bytes: the last partial sector is kept.
    qcow2_image(p, &[], "src.qcow2", "1M", &["write -P 9 0 64k"]);
    for x in ["ours", "theirs"] {
        let args = [
            "dd",
            "-O",
            "qcow2",
            "if=src.qcow2",
            &format!("of={x}.qcow2"),
            "bs=3000",
            "count=7",
            "skip=2",
        ];
        let (code, _) = if x == "ours" {
            qimg(p, &args)
        } else {
            qemu(p, &args)
        };
        assert_eq!(code, 0, "{x}");
        assert_eq!(qemu(p, &["check", &format!("{x}.qcow2")]).0, 0, "{x}");
        let (raw, qcow) = (format!("{x}.raw"), format!("{x}.qcow2"));
        assert_eq!(qemu(p, &["convert", "-O", "raw", &qcow, &raw]).0, 0);
    }
    let ours = std::fs::read(p.join("ours.raw")).unwrap();
    assert_eq!(ours, std::fs::read(p.join("theirs.raw")).unwrap());
    assert_eq!(ours.len(), 15360);
    assert_eq!(ours[..15000], [9u8; 15000]);
}

#[test]
fn create_opens_the_backing_file_unless_u_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &["write -P 1 0 64k"]);
    std::fs::write(p.join("r.raw"), vec![0u8; 1 << 20]).unwrap();
    let a = std::fs::read(p.join("a.qcow2")).unwrap();
    for args in [
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "/nonexist.qcow2",
            "-F",
            "qcow2",
            "b.qcow2",
            "1G",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nonexist.qcow2",
            "b.qcow2",
            "1G",
        ],
        &[
            "create", "-f", "qcow2", "-b", "r.raw", "-F", "qcow2", "b.qcow2", "1G",
        ],
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ],
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2",
        ],
        &[
            "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ],
        // No -F: refused, with the format detected when the backing file was opened.
        &["create", "-f", "qcow2", "-b", "a.qcow2", "b.qcow2"],
        &["create", "-f", "qcow2", "-b", "r.raw", "b.qcow2"],
        &[
            "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "b.qcow2", "1M",
        ],
    ] {
        same(p, args);
        assert!(!p.join("b.qcow2").exists(), "{args:?}");
        assert!(std::fs::read(p.join("a.qcow2")).unwrap() == a, "{args:?}");
    }
    let err = qimg_stderr(
        p,
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ],
    );
    assert!(
        err.contains(
            "a.qcow2: Error: Trying to create an image with the same filename as the backing file"
        ),
        "{err}"
    );
    let err = qimg_stderr(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "/nonexist.qcow2",
            "-F",
            "qcow2",
            "b.qcow2",
            "1G",
        ],
    );
    assert!(err.contains("Could not open backing image."), "{err}");
    // -u does not open it; a backing file that opens is fine with a size given.
    for args in [
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/nonexist.qcow2",
            "-F",
            "qcow2",
            "X",
            "1G",
        ][..],
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "raw", "X", "1G",
        ],
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "X", "2M",
        ],
    ] {
        let (c1, o1) = qimg(p, &with_name(args, "ours.qcow2"));
        let (c2, o2) = qemu(p, &with_name(args, "theirs.qcow2"));
        assert_eq!(
            (c1, o1.replace("ours", "X")),
            (c2, o2.replace("theirs", "X")),
            "{args:?}"
        );
        assert_eq!(c1, 0, "{args:?}");
    }
}

#[test]
fn empty_qcow2_images_have_no_leaked_cluster() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "src.qcow2", "1M", &["write -P 9 0 64k"]);
    for args in [
        &["create", "-q", "-f", "qcow2", "X", "0"][..],
        &["dd", "-O", "qcow2", "if=src.qcow2", "of=X", "count=0"],
        &[
            "dd",
            "-O",
            "qcow2",
            "if=src.qcow2",
            "of=X",
            "bs=64k",
            "skip=100",
        ],
    ] {
        let (c1, o1) = qimg(p, &with_name(args, "ours.qcow2"));
        let (c2, o2) = qemu(p, &with_name(args, "theirs.qcow2"));
        assert_eq!((c1, o1), (c2, o2), "{args:?}");
        same(p, &["check", "ours.qcow2"]);
        assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0, "{args:?}");
        assert_eq!(
            info_sans_sizes(p, "ours.qcow2", "ours"),
            info_sans_sizes(p, "theirs.qcow2", "theirs"),
            "{args:?}"
        );
    }
}

#[test]
fn convert_target_is_zero_requires_n() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "src.qcow2", "1M", &["write -P 9 0 64k"]);
    for args in [
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "qcow2",
            "src.qcow2",
            "out.qcow2",
        ][..],
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "src.qcow2",
            "out.raw",
        ],
        &[
            "convert",
            "--target-is-zero",
            "-t",
            "bogus",
            "src.qcow2",
            "out.raw",
        ],
        &["convert", "--target-is-zero", "missing.qcow2", "out.raw"],
    ] {
        same(p, args);
        assert!(
            !p.join("out.qcow2").exists() && !p.join("out.raw").exists(),
            "{args:?}"
        );
    }
    let err = qimg_stderr(p, &["convert", "--target-is-zero", "src.qcow2", "out.raw"]);
    assert!(
        err.contains("--target-is-zero requires use of -n flag"),
        "{err}"
    );
}

#[test]
fn check_and_info_match_on_qemu_written_images() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &[],
        "a.qcow2",
        "64M",
        &[
            "write -P 1 0 100k",
            "write -c -P 2 1M 64k",
            "write -z 2M 64k",
        ],
    );
    qcow2_image(p, &["-b", "a.qcow2", "-F", "qcow2"], "b.qcow2", "", &[]);
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for img in ["a.qcow2", "b.qcow2"] {
        same(p, &["check", img]);
        same(p, &["check", "--output=json", img]);
        same(p, &["info", img]);
    }
    same(p, &["info", "r.raw"]);
    assert_eq!(same(p, &["check", "r.raw"]), "");
    assert_eq!(qimg(p, &["check", "r.raw"]).0, 63);
    // A repair opens it for writing: the probing warning as well.
    same(p, &["check", "-r", "leaks", "r.raw"]);
}

#[test]
fn extended_l2_images_check_and_fail_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_extended_l2(p);
    for img in ["xl2.qcow2", "d/xl2top.qcow2"] {
        same(p, &["check", img]);
        same(p, &["check", "--output=json", img]);
    }
    // Corrupt bitmaps: a subcluster allocated and zero (cluster 0), allocated subclusters
    // in an unallocated cluster (cluster 5), a bitmap on a compressed cluster (cluster 32).
    let data = std::fs::read(p.join("xl2.qcow2")).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    let l2 = (be64(be64(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut bad = data.clone();
    for (cluster, bits) in [(0usize, 1u64 << 9 | 1 << 41), (5, 1 << 2), (32, 1 << 40)] {
        let at = l2 + cluster * 16 + 8;
        let old = u64::from_be_bytes(bad[at..at + 8].try_into().unwrap());
        bad[at..at + 8].copy_from_slice(&(old | bits).to_be_bytes());
    }
    std::fs::write(p.join("bad.qcow2"), &bad).unwrap();
    // Misaligned host offsets: with data (cluster 0), and with zero subclusters only
    // (cluster 16, "preallocated": the repair drops the host cluster, keeps the zero bits).
    let mut misaligned = data.clone();
    for (cluster, host) in [(0usize, None), (16, Some(0x50200u64 | 1 << 63))] {
        let at = l2 + cluster * 16;
        let old = u64::from_be_bytes(misaligned[at..at + 8].try_into().unwrap());
        let new = host.unwrap_or(old + 0x200);
        misaligned[at..at + 8].copy_from_slice(&new.to_be_bytes());
    }
    std::fs::write(p.join("misaligned.qcow2"), &misaligned).unwrap();
    for r in ["leaks", "all"] {
        same_check_on_copies(p, "misaligned.qcow2", &["-r", r]);
    }
    let (_, err) = same_check_on_copies(p, "misaligned.qcow2", &["-r", "all"]);
    assert!(
        err.contains("Repairing offset=50200: Preallocated"),
        "{err}"
    );
    same(p, &["check", "bad.qcow2"]);
    same(p, &["check", "--output=json", "bad.qcow2"]);
    same(p, &["info", "bad.qcow2"]);
    // What qemu-img refuses to create.
    for o in [
        "extended_l2=on,cluster_size=8k",
        "extended_l2=on,compat=0.10",
    ] {
        same(p, &["create", "-f", "qcow2", "-o", o, "e.qcow2", "1M"]);
    }
    // Copies into extended-L2 images, with and without a backing file for the target.
    for (args, out) in [
        (&["-O", "qcow2", "-o", "extended_l2=on"][..], "c.qcow2"),
        (&["-O", "qcow2", "-c", "-o", "extended_l2=on"], "cc.qcow2"),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on",
                "-B",
                "xbase.qcow2",
                "-F",
                "qcow2",
            ],
            "d/cb.qcow2",
        ),
    ] {
        let src = if out.starts_with("d/") {
            "d/xl2top.qcow2"
        } else {
            "xl2.qcow2"
        };
        let mut a = vec!["convert"];
        a.extend(args);
        a.extend([src, out]);
        assert_eq!(qimg(p, &a).0, 0, "{a:?}");
        assert_eq!(qemu(p, &["check", out]).0, 0, "{a:?}");
        assert_eq!(qemu(p, &["compare", src, out]).0, 0, "{a:?}");
        same(p, &["map", "--output=json", out]);
    }
}

#[test]
fn extended_l2_snapshots_copied_flags_and_resize_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_extended_l2(p);
    qemu(p, &["snapshot", "-c", "s1", "xl2.qcow2"]);
    qemu_io(p, "xl2.qcow2", &["write -P 7 5k 1k", "write -z 3M 2k"]);
    same(p, &["check", "xl2.qcow2"]);
    same(p, &["map", "--output=json", "xl2.qcow2"]);
    for (tool, out) in [("qimg", "ours.raw"), ("qemu-img", "theirs.raw")] {
        let args = ["convert", "-l", "s1", "-O", "raw", "xl2.qcow2", out];
        let code = match tool {
            "qimg" => qimg(p, &args).0,
            _ => qemu(p, &args).0,
        };
        assert_eq!(code, 0, "{tool}");
    }
    assert!(
        std::fs::read(p.join("ours.raw")).unwrap() == std::fs::read(p.join("theirs.raw")).unwrap()
    );
    // A COPIED flag missing on a cluster whose refcount is 1 (the L2 table after the
    // snapshot's copy-on-write): reported and repaired alike.
    let data = std::fs::read(p.join("xl2.qcow2")).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    let l2 = (be64(be64(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut bad = data.clone();
    let entry = be64(l2) & !(1 << 63);
    bad[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(p.join("copied.qcow2"), &bad).unwrap();
    same(p, &["check", "copied.qcow2"]);
    assert_eq!(qemu(p, &["check", "copied.qcow2"]).0, 2, "a corruption");
    let (ours, theirs) = same_on_copies(p, "copied.qcow2", &["check", "-r", "all", "X"]);
    assert!(std::fs::read(p.join(ours)).unwrap() == std::fs::read(p.join(theirs)).unwrap());
    // Growing and shrinking.
    for args in [
        &["resize", "X", "+3M"][..],
        &["resize", "--shrink", "X", "1M"],
    ] {
        let (ours, _) = same_on_copies(p, "xl2.qcow2", args);
        assert_eq!(qemu(p, &["check", &ours]).0, 0, "{args:?}");
        same(p, &["map", "--output=json", &ours]);
    }
}

/// Commands that open a dirty image for writing repair it first and print the repair on
/// stderr as qemu-img does (it was done silently), then do their work on a clean image. An
/// amend whose options are refused repairs it too (the options are read after the open).
#[test]
fn writing_commands_show_the_repair_of_a_dirty_image_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_dirty_qcow2(p, "dirty.qcow2");
    let cases: &[&[&str]] = &[
        &["resize", "X", "+1M"],
        &["snapshot", "-c", "s", "X"],
        &["amend", "-o", "lazy_refcounts=off", "X"],
        &["rebase", "-u", "-b", "", "X"],
        &["bench", "-w", "-c", "1", "X"],
        &["amend", "-o", "bogus=1", "X"],
        &["amend", "-o", "cluster_size=4k", "X"],
        &["amend", "-o", "compat=0.9", "X"],
        &["amend", "-o", "size=abc", "X"],
    ];
    for args in cases {
        let outcomes = run_on_copies(p, "dirty.qcow2", args, |copy| qemu(p, &["check", copy]).0);
        assert_eq!(outcomes[0], outcomes[1], "qimg vs qemu-img: {args:?}");
        assert!(outcomes[0].2.contains("Repairing cluster"), "{args:?}");
        assert_eq!(outcomes[0].3, 0, "qemu-img check after {args:?}");
    }
}

/// Runs `args` (`X` standing for the image) through qimg and qemu-img, each on its own copy
/// of `img` in `dir`, and `after` on each copy once its tool is done. Returns, qimg's first,
/// each tool's exit code, stdout, stderr (the copy named `X`) and what `after` found.
fn run_on_copies<T>(
    dir: &Path,
    img: &str,
    args: &[&str],
    after: impl Fn(&str) -> T,
) -> Vec<(i32, String, String, T)> {
    let mut outcomes = Vec::new();
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let copy = format!("{prog}-{img}");
        std::fs::copy(dir.join(img), dir.join(&copy)).unwrap();
        let a: Vec<String> = args
            .iter()
            .map(|&x| {
                if x == "X" {
                    copy.clone()
                } else {
                    x.replace("{X}", &copy)
                }
            })
            .collect();
        let (code, out, err) = run_with_stderr(dir, tool, prog, &a);
        outcomes.push((code, out, err.replace(&copy, "X"), after(&copy)));
    }
    outcomes
}

/// The header's big-endian u64 at byte `at` of image `path`.
fn header_u64(path: &Path, at: u64) -> u64 {
    let mut bytes = [0u8; 8];
    let f = std::fs::File::open(path).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, at).unwrap();
    u64::from_be_bytes(bytes)
}

/// A dirty image whose repair fails (a snapshot's L1 table lies past the end of the file)
/// cannot be opened for writing and stays dirty, as with qemu-img: closing the half-repaired
/// image used to write the stale refcounts back and clear the dirty bit, and the next writer
/// then allocated clusters still in use (guest data overwritten).
#[test]
fn a_dirty_image_whose_repair_fails_stays_dirty_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &["-o", "lazy_refcounts=on"],
        "d.qcow2",
        "64M",
        &["write -P 0x61 0 1M"],
    );
    qemu(p, &["snapshot", "-c", "s1", "d.qcow2"]);
    let _ = run(
        p,
        "qemu-io",
        &["-c", "write -P 0x62 8M 1M", "-c", "abort", "d.qcow2"],
    );
    let image = p.join("d.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    let snapshots = header_u64(&image, 64);
    std::os::unix::fs::FileExt::write_all_at(&f, &(1u64 << 63).to_be_bytes(), snapshots).unwrap();
    assert_eq!(
        header_u64(&image, 72) & 1,
        1,
        "qemu-io left the image dirty"
    );
    let outcomes = run_on_copies(p, "d.qcow2", &["resize", "X", "+1M"], |copy| {
        header_u64(&p.join(copy), 72) & 1
    });
    let (code, _, err, dirty) = &outcomes[0];
    assert_eq!(*code, 1);
    assert_eq!(*dirty, 1, "qimg cleared the dirty bit: {err}");
    let last_line = |err: &str| err.lines().last().unwrap_or_default().to_owned();
    assert_eq!(
        last_line(err),
        "PROG: Could not open 'X': Could not repair dirty image: Input/output error"
    );
    assert_eq!(
        last_line(&outcomes[1].2),
        last_line(err),
        "as qemu-img says it"
    );
    assert_eq!((outcomes[1].0, outcomes[1].3), (1, 1), "qemu-img");
}

/// Sets (`on`) or clears incompatible or autoclear feature bit `bit` of `path`'s header
/// (`field_at`: 72 incompatible, 88 autoclear).
fn set_feature_bit(path: &Path, field_at: u64, bit: u32, on: bool) {
    let bits = header_u64(path, field_at);
    let bits = if on {
        bits | 1 << bit
    } else {
        bits & !(1 << bit)
    };
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &bits.to_be_bytes(), field_at).unwrap();
}

/// A data file name in the header without the external-data-file bit is only a name, as in
/// QEMU: the guest data is in the image file (qimg read it from the named file, and
/// `check -r leaks` freed every data cluster of the image as leaked); and the data-file-raw
/// bit without a data file is refused.
#[test]
fn a_data_file_name_without_its_feature_bit_keeps_the_data_in_the_image_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &["-o", "data_file=named.raw"], "a.qcow2", "4M", &[]);
    std::fs::write(p.join("named.raw"), vec![0xee; 4 << 20]).unwrap();
    set_feature_bit(&p.join("a.qcow2"), 72, 2, false);
    qemu_io(
        p,
        "a.qcow2",
        &["write -P 0x61 0 192k", "write -P 0x62 2M 64k"],
    );
    assert!(same(p, &["info", "a.qcow2"]).contains("data file: named.raw"));
    same(p, &["check", "a.qcow2"]);
    same(p, &["map", "--output=json", "a.qcow2"]);
    same(p, &["map", "a.qcow2"]);
    assert_eq!(qimg(p, &["convert", "-O", "raw", "a.qcow2", "a.raw"]).0, 0);
    assert_eq!(qemu(p, &["compare", "a.qcow2", "a.raw"]).0, 0);
    same(p, &["check", "-r", "leaks", "a.qcow2"]);
    assert_eq!(qemu(p, &["check", "a.qcow2"]).0, 0);
    same(p, &["amend", "-o", "data_file=other.raw", "a.qcow2"]);
    set_feature_bit(&p.join("a.qcow2"), 88, 1, true);
    same(p, &["check", "a.qcow2"]);
    same(p, &["map", "a.qcow2"]);
}

#[test]
fn check_reports_and_repairs_a_dirty_image_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_dirty_qcow2(p, "a.qcow2");
    std::fs::copy(p.join("a.qcow2"), p.join("b.qcow2")).unwrap();
    same(p, &["check", "--output=json", "a.qcow2"]);
    assert_eq!(
        qimg(p, &["check", "a.qcow2"]).0,
        2,
        "stale refcounts are corruptions"
    );
    // The repair itself is shown (not done silently when the image is opened).
    let (code, err) = same_check_on_copies(p, "a.qcow2", &["-r", "all"]);
    assert_eq!(code, 0);
    assert!(err.contains("Rebuilding refcount structure"), "{err}");
    assert_eq!(same_check_on_copies(p, "a.qcow2", &["-r", "leaks"]).0, 1);
    assert_eq!(qimg(p, &["check", "-r", "all", "a.qcow2"]).0, 0);
    assert_eq!(
        qemu(p, &["check", "a.qcow2"]).0,
        0,
        "qemu-img agrees the repair worked"
    );
    assert!(!qemu(p, &["info", "a.qcow2"]).1.contains("dirty"));
    assert_eq!(
        qemu(p, &["compare", "a.qcow2", "b.qcow2"]).0,
        0,
        "repair lost no data"
    );
}

/// `convert -c` stores a cluster compressed whenever that saves a byte, as qemu-img does
/// (qimg wanted an eighth of the cluster saved), with zlib and with zstd.
#[test]
fn convert_c_compresses_every_cluster_that_shrinks_like_qemu_img() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Data that does not compress (xorshift), with 0, 4 or 8 KiB of zeros at the start of
    // each 64 KiB cluster.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut noise = vec![0u8; 256 << 10];
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for (cluster, zeros) in [(0usize, 4096usize), (2, 8192), (3, 512)] {
        noise[cluster << 16..(cluster << 16) + zeros].fill(0);
    }
    let f = std::fs::File::create(p.join("noise.raw")).unwrap();
    f.write_all_at(&noise, 0).unwrap();
    // The map without host offsets (compressed sizes differ between the tools).
    let map = |img: &str| -> Vec<String> {
        qemu(p, &["map", "--output=json", img])
            .1
            .lines()
            .map(|l| l.split(", \"offset\"").next().unwrap().to_string())
            .collect()
    };
    for opts in ["compression_type=zlib", "compression_type=zstd"] {
        let a = ["convert", "-c", "-O", "qcow2", "-o", opts, "noise.raw"];
        assert_eq!(qimg(p, &[&a[..], &["ours.qcow2"]].concat()).0, 0);
        assert_eq!(qemu(p, &[&a[..], &["theirs.qcow2"]].concat()).0, 0);
        assert_eq!(qemu(p, &["compare", "noise.raw", "ours.qcow2"]).0, 0);
        assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0);
        let ours = map("ours.qcow2");
        assert!(
            ours.iter().any(|l| l.contains("\"compressed\": true")),
            "{ours:?}"
        );
        assert_eq!(ours, map("theirs.qcow2"), "{opts}");
        // The file ends on a whole sector, as qemu-img's last compressed write leaves it.
        let len = std::fs::metadata(p.join("ours.qcow2")).unwrap().len();
        assert_eq!(len % 512, 0, "{opts}: {len}");
    }
    // With nothing to compress, the files are alike to the byte count.
    std::fs::File::create(p.join("empty.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let a = ["convert", "-c", "-O", "qcow2", "empty.raw"];
    assert_eq!(qimg(p, &[&a[..], &["ours.qcow2"]].concat()).0, 0);
    assert_eq!(qemu(p, &[&a[..], &["theirs.qcow2"]].concat()).0, 0);
    let len = |img: &str| std::fs::metadata(p.join(img)).unwrap().len();
    assert_eq!(len("ours.qcow2"), len("theirs.qcow2"));
}

#[test]
fn convert_roundtrips_are_identical_for_qemu_img_compare() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &[],
        "src.qcow2",
        "32M",
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
    // Several sources are concatenated: the same bytes as qemu-img's.
    assert_eq!(
        qimg(p, &["convert", "-O", "raw", "o.raw", "o.raw", "two.raw"]).0,
        0
    );
    assert_eq!(
        qemu(p, &["convert", "-O", "raw", "o.raw", "o.raw", "theirs.raw"]).0,
        0
    );
    let two = std::fs::read(p.join("two.raw")).unwrap();
    assert_eq!(two.len(), 64 << 20);
    assert!(two == std::fs::read(p.join("theirs.raw")).unwrap());
    // Guest data in an external data file (read from there, not from the image file).
    qcow2_image(
        p,
        &["-o", "data_file=ext.data"],
        "ext.qcow2",
        "8M",
        &["write -P 3 0 64k", "write -P 5 5M 1M"],
    );
    assert_eq!(
        qimg(p, &["convert", "-O", "raw", "ext.qcow2", "ext.raw"]).0,
        0
    );
    assert_eq!(qemu(p, &["compare", "ext.qcow2", "ext.raw"]).0, 0);
}

/// qemu-img info does not open an external data file (BDRV_O_NO_IO): an image whose data
/// file is missing still shows its information; what reads data fails naming the file.
#[test]
fn info_works_without_the_data_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &["-o", "data_file=gone.data"], "a.qcow2", "4M", &[]);
    std::fs::remove_file(p.join("gone.data")).unwrap();
    for args in [
        &["info", "a.qcow2"][..],
        &["info", "--output=json", "a.qcow2"],
        &["info", "--backing-chain", "a.qcow2"],
        &["check", "a.qcow2"],
        &["map", "a.qcow2"],
    ] {
        same(p, args);
    }
}

/// Encrypted images: info shows the encryption (LUKS header, key slots) without a key, as
/// qemu-img does; what needs the data is refused.
#[test]
fn info_shows_encryption_without_a_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let secret = "secret,id=sec0,data=abc";
    let luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    for (name, opts) in [
        ("luks.qcow2", luks.to_string()),
        (
            "essiv.qcow2",
            format!(
                "{luks},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,\
                 encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512"
            ),
        ),
        (
            "aes.qcow2",
            "encrypt.format=aes,encrypt.key-secret=sec0".to_string(),
        ),
    ] {
        let create = [
            "create", "-q", "-f", "qcow2", "--object", secret, "-o", &opts, name, "4M",
        ];
        assert_eq!(qemu(p, &create).0, 0, "{name}");
        same(p, &["info", name]);
        same(p, &["info", "--output=json", name]);
    }
    assert_eq!(qimg(p, &["check", "luks.qcow2"]).0, 1);
}

/// `qemu-img convert -O raw SRC DST`.
fn raw_copy(dir: &Path, src: &str, dst: &str) {
    assert_eq!(qemu(dir, &["convert", "-O", "raw", src, dst]).0, 0, "{src}");
}

/// Images for the compare tests, in `dir`: a.qcow2 (8 MiB: data, a zero cluster), b.qcow2
/// (the same but one byte), longx.qcow2 (a.qcow2's contents, 12 MiB, data past 8 MiB).
/// Returns the qemu-io writes that made a.qcow2.
fn compare_images(dir: &Path) -> [&'static str; 3] {
    let data = ["write -P 1 0 1M", "write -P 2 3M 100k", "write -z 5M 64k"];
    qcow2_image(dir, &[], "a.qcow2", "8M", &data);
    qcow2_image(
        dir,
        &[],
        "b.qcow2",
        "8M",
        &[&data[..], &["write -P 9 3100k 1"]].concat(),
    );
    qcow2_image(
        dir,
        &[],
        "longx.qcow2",
        "12M",
        &[&data[..], &["write -P 3 10M 4k"]].concat(),
    );
    data
}

/// Identical and different images, of the same size or not (the extra part zeros or data),
/// qcow2 against raw, plain and strict: the same verdict, words and exit code as qemu-img.
#[test]
fn compare_matches_on_contents_sizes_and_formats() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let data = compare_images(p);
    qcow2_image(
        p,
        &[],
        "z.qcow2",
        "8M",
        &[&data[..], &["write -P 7 7M 512"]].concat(),
    );
    // 12 MiB: the same first 8 MiB, then zeros (unallocated, a zero cluster); longx.qcow2
    // has data there.
    qcow2_image(
        p,
        &[],
        "long.qcow2",
        "12M",
        &[&data[..], &["write -z 9M 64k"]].concat(),
    );
    qcow2_image(p, &[], "e.qcow2", "8M", &[]);
    qcow2_image(p, &[], "x.qcow2", "8M", &[]);
    qemu_io(p, "x.qcow2", &["write -P 1 0 1M", "write -P 2 3M 100k"]);
    for (src, dst) in [
        ("a.qcow2", "a.raw"),
        ("b.qcow2", "b.raw"),
        ("longx.qcow2", "longx.raw"),
    ] {
        raw_copy(p, src, dst);
    }
    // Raw files of 1000 bytes (read as 1024): the last 24 bytes zeros, or not.
    let text: Vec<u8> = (0..1024u32).map(|i| (i % 251 + 1) as u8).collect();
    std::fs::write(p.join("odd.raw"), &text[..1000]).unwrap();
    std::fs::write(
        p.join("odd24.raw"),
        [&text[..1000], &[0; 10], &[1], &[0; 13]].concat(),
    )
    .unwrap();
    let cases: &[&[&str]] = &[
        &["a.qcow2", "a.qcow2"],
        &["a.qcow2", "b.qcow2"],
        &["b.qcow2", "a.qcow2"],
        &["a.qcow2", "z.qcow2"],
        &["-q", "a.qcow2", "z.qcow2"],
        &["a.qcow2", "a.raw"],
        &["a.raw", "a.qcow2"],
        &["b.raw", "a.qcow2"],
        &["z.qcow2", "a.raw"],
        &["a.qcow2", "x.qcow2"],
        &["a.qcow2", "e.qcow2"],
        &["a.qcow2", "long.qcow2"],
        &["long.qcow2", "a.qcow2"],
        &["a.qcow2", "longx.qcow2"],
        &["longx.raw", "a.raw"],
        &["-f", "raw", "a.qcow2", "a.raw"],
        &["-s", "a.qcow2", "long.qcow2"],
        &["-s", "a.qcow2", "a.qcow2"],
        &["-s", "a.raw", "a.raw"],
        &["-s", "a.qcow2", "a.raw"],
        &["-s", "a.qcow2", "x.qcow2"],
        &["-s", "a.qcow2", "z.qcow2"],
        &["-s", "-f", "raw", "-F", "raw", "a.qcow2", "a.qcow2"],
        &[
            "--strict",
            "--a-format=qcow2",
            "--b-format",
            "raw",
            "a.qcow2",
            "a.raw",
        ],
        &["a.qcow2", "missing.qcow2"],
        &["missing.qcow2", "a.qcow2"],
        &["-F", "qcow2", "a.raw", "a.raw"],
        &["odd.raw", "odd24.raw"],
        &["-s", "odd.raw", "odd24.raw"],
        &["-s", "zkept.qcow2", "zplain.qcow2"],
        &["-s", "zplain.qcow2", "zkept.qcow2"],
    ];
    // Zero clusters with and without a host cluster of their own: the same contents, a
    // different block status.
    qcow2_image(
        p,
        &[],
        "zkept.qcow2",
        "1M",
        &["write -P 1 0 128k", "write -z 0 64k", "write -z -u 64k 64k"],
    );
    qcow2_image(
        p,
        &[],
        "zplain.qcow2",
        "1M",
        &["write -P 1 0 128k", "write -z 0 128k"],
    );
    for args in cases {
        same(p, &[&["compare"], *args].concat());
    }
}

/// Backing chains are compared through: a difference only in a backing file, a zero cluster
/// over data of the backing file, an image longer than its backing file (whose zeros the
/// block layer counts as allocated), a raw backing file.
#[test]
fn compare_reads_backing_chains_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for x in ["A", "B", "Z"] {
        let base = format!("{x}base.qcow2");
        qcow2_image(
            p,
            &[],
            &base,
            "4M",
            &["write -P 1 0 1M", "write -P 2 2M 512k"],
        );
        let top = &format!("{x}top.qcow2");
        let opts = ["-b", &base, "-F", "qcow2"];
        qcow2_image(
            p,
            &opts,
            top,
            "6M",
            &["write -P 4 1M 100k", "write -P 5 5M 64k"],
        );
    }
    qemu_io(p, "Bbase.qcow2", &["write -P 9 2500k 1"]);
    qemu_io(p, "Ztop.qcow2", &["write -z 0 64k"]);
    raw_copy(p, "Atop.qcow2", "Atop.raw");
    raw_copy(p, "Abase.qcow2", "rbase.raw");
    let opts = ["-b", "rbase.raw", "-F", "raw"];
    qcow2_image(
        p,
        &opts,
        "rtop.qcow2",
        "6M",
        &["write -P 4 1M 100k", "write -P 5 5M 64k"],
    );
    // Nothing but a backing file shorter than the image, against an empty image.
    qcow2_image(p, &[], "ebase.qcow2", "4M", &[]);
    qcow2_over(p, "ebase.qcow2", "etop.qcow2", "6M", &[]);
    qcow2_image(p, &[], "empty.qcow2", "6M", &[]);
    let cases: &[&[&str]] = &[
        &["Atop.qcow2", "Btop.qcow2"],
        &["Atop.qcow2", "Ztop.qcow2"],
        &["Ztop.qcow2", "Atop.raw"],
        &["Atop.qcow2", "Atop.raw"],
        &["rtop.qcow2", "Atop.qcow2"],
        &["Abase.qcow2", "Atop.qcow2"],
        &["Atop.qcow2", "Abase.qcow2"],
        &["-s", "Atop.qcow2", "Atop.qcow2"],
        &["-s", "Ztop.qcow2", "Ztop.qcow2"],
        &["-s", "Atop.qcow2", "Btop.qcow2"],
        &["-s", "Atop.qcow2", "Atop.raw"],
        &["-s", "rtop.qcow2", "Atop.qcow2"],
        &["etop.qcow2", "empty.qcow2"],
        &["-s", "etop.qcow2", "empty.qcow2"],
        &["-s", "empty.qcow2", "etop.qcow2"],
    ];
    for args in cases {
        same(p, &[&["compare"], *args].concat());
    }
}

/// The host offset of the compressed data of guest cluster 0 of a qcow2 image.
fn compressed_cluster_offset(dir: &Path, img: &str) -> u64 {
    let f = std::fs::read(dir.join(img)).unwrap();
    let be = |at: u64| u64::from_be_bytes(f[at as usize..at as usize + 8].try_into().unwrap());
    let cluster_bits = be(16) & 0xffff_ffff;
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00;
    let entry = be(l2);
    assert_ne!(entry & (1 << 62), 0, "cluster 0 of {img} is not compressed");
    entry & ((1 << (62 - (cluster_bits - 8))) - 1)
}

/// `convert --salvage` copies a cluster that does not decompress as zeros, with qemu-img's
/// warning for every sector (none with -q), into raw and qcow2 targets alike.
#[test]
fn convert_salvage_copies_unreadable_sectors_as_zeros_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "text.qcow2", "1M", &["write -P 1 0 1M"]);
    raw_copy(p, "text.qcow2", "text.raw");
    assert_eq!(
        qemu(p, &["convert", "-c", "-O", "qcow2", "text.raw", "c.qcow2"]).0,
        0
    );
    patch(
        p,
        "c.qcow2",
        compressed_cluster_offset(p, "c.qcow2"),
        &[0xff; 64],
    );
    for args in [
        &["convert", "--salvage", "-O", "raw", "c.qcow2", "X"][..],
        &["convert", "-q", "--salvage", "-O", "qcow2", "c.qcow2", "X"],
        &["convert", "-O", "raw", "c.qcow2", "X"],
    ] {
        let (ours, theirs) = (with_name(args, "ours.img"), with_name(args, "theirs.img"));
        let o = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &ours);
        let t = run_with_stderr(p, "qemu-img", "qemu-img", &theirs);
        if args.contains(&"--salvage") {
            assert_eq!(o, t, "{args:?}");
            assert_eq!(qemu(p, &["compare", "ours.img", "theirs.img"]).0, 0);
        } else {
            assert_eq!((o.0, t.0), (1, 1), "{args:?}");
        }
    }
    let (_, _, warnings) = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &["convert", "--salvage", "-O", "raw", "c.qcow2", "o.raw"],
    );
    assert_eq!(
        warnings.lines().count(),
        128,
        "one per sector of the 64 KiB cluster"
    );
    // Block status that fails (corrupt metadata: an unaligned L2 entry for the first
    // cluster): the failing sectors are read as data, copied as zeros, the rest copied.
    layout_qcow2(p, "good.qcow2");
    damaged(p, "u.qcow2", &[(L2, (1 << 63) | 0x50200, 8)], None);
    let args = ["convert", "--salvage", "-O", "raw", "u.qcow2"];
    let (code, _, warnings) = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &[&args[..], &["ours.raw"]].concat(),
    );
    assert_eq!(code, 0, "{warnings}");
    assert!(
        warnings.contains("warning: error while reading block status at offset 0:"),
        "{warnings}"
    );
    assert_eq!(qemu(p, &[&args[..], &["theirs.raw"]].concat()).0, 0);
    assert_eq!(qemu(p, &["compare", "ours.raw", "theirs.raw"]).0, 0);
}

/// A source on failing media (reads of 4 KiB in its seventh MiB fail with EIO): convert stops
/// with qemu-img's error (naming the start of the 2 MiB piece qemu-img reads) and exit code
/// 1, or with `--salvage` copies the sectors that fail as zeros with its warnings, into raw
/// and qcow2 targets alike, with `-S 0` and `-C`, and after another source that leaves the
/// failing one's map unaligned in the chunk. qimg reads raw sources through a memory map,
/// where such a page raised SIGBUS and killed it (raw targets) or failed the target's write
/// with EFAULT (qcow2 targets), `--salvage` or not. The source spans 6 chunks, so that other
/// workers are stopped by the failure (their error must not be the one reported).
#[test]
fn convert_of_a_source_with_read_errors_fails_or_salvages_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Every other MiB holds data; the bad range sits inside a data MiB, past its first page.
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| match (i >> 20) % 2 {
            0 => (i % 251) as u8 | 1,
            _ => 0,
        })
        .collect();
    std::fs::write(p.join("data.raw"), &data).unwrap();
    // One-sector sources to go first.
    std::fs::write(p.join("sector.raw"), [5u8; 512]).unwrap();
    let (code, _) = qemu(p, &["convert", "-O", "qcow2", "sector.raw", "sector.qcow2"]);
    assert_eq!(code, 0);
    // The same disk as a qcow2 image, its guest byte 6 MiB found in the file by `map`.
    let (code, _) = qemu(p, &["convert", "-O", "qcow2", "data.raw", "data.qcow2"]);
    assert_eq!(code, 0);
    let (_, map) = qemu(p, &["map", "--output=json", "data.qcow2"]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at_6m = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["start"] == 6 << 20)
        .and_then(|e| e["offset"].as_u64())
        .expect("guest MiB 6 stored plainly");
    let qcow2 = std::fs::read(p.join("data.qcow2")).unwrap();
    for (format, bytes, bad_at) in [("raw", data, 6 << 20), ("qcow2", qcow2, at_6m)] {
        let bad = bad_at + 8192..bad_at + 12288;
        let source = cowbird_tests::unreadable_file::UnreadableFile::new(bytes, bad);
        let source = source.path();
        let source = source.to_str().unwrap();
        for target in ["raw", "qcow2"] {
            let sector = format!("sector.{format}");
            let options: [&[&str]; 5] = [&[], &["--salvage"], &["-S", "0"], &["-C"], &[&sector]];
            for extra in options {
                let mut args = vec!["convert", "-f", format, "-O", target];
                args.extend(extra);
                args.extend([source, "X"]);
                check_convert_of_unreadable_source(p, &args);
            }
        }
    }
}

/// An image whose refcount block cannot be read (failing media) still maps, measures,
/// compares and converts, as in qemu-img: reads need no refcount, and the refcounts that
/// `map` and `measure` consult to spot metadata preallocation are given up on.
#[test]
fn reading_commands_do_without_an_unreadable_refcount_block_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "a.qcow2");
    let bytes = std::fs::read(p.join("a.qcow2")).unwrap();
    let served =
        cowbird_tests::unreadable_file::UnreadableFile::new(bytes, REFBLOCK..REFBLOCK + 4096);
    let served = served.path();
    let img = served.to_str().unwrap();
    for args in [
        &["map", img][..],
        &["map", "--output=json", img],
        &["measure", "-O", "qcow2", img],
        &["compare", img, "a.qcow2"],
        &["convert", "-O", "raw", img, "out.raw"],
    ] {
        let out = same(p, args);
        assert!(!out.is_empty() || args[0] == "convert", "{args:?}");
    }
    assert_eq!(qemu(p, &["compare", "a.qcow2", "out.raw"]).0, 0);
}

/// An L2 table that cannot be read fails the reading commands with qemu-img's words and
/// exit codes: each command's own context, then the system's words alone.
#[test]
fn an_unreadable_l2_table_fails_reading_commands_in_qemu_img_words() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "a.qcow2");
    let bytes = std::fs::read(p.join("a.qcow2")).unwrap();
    let served = cowbird_tests::unreadable_file::UnreadableFile::new(bytes, L2..L2 + 4096);
    let served = served.path();
    let img = served.to_str().unwrap();
    let input = format!("if={img}");
    for args in [
        &["map", img][..],
        &["map", "--output=json", img],
        &["measure", "-O", "qcow2", img],
        &["compare", img, "a.qcow2"],
        &["convert", "-O", "raw", img, "out.raw"],
        &["dd", &input, "of=out.dd"],
        &["bench", "-c", "1", img],
    ] {
        let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        same(p, args);
        assert!(code != 0, "{args:?}");
        assert!(
            err.ends_with(": Input/output error\n") || args[0] == "compare",
            "{err}"
        );
    }
}

/// The metadata-preallocation guess reads a layer's refcounts at its first block status
/// query, as QEMU's does: a backing file that `map` never asks about (the top allocates
/// everything) is not read, so its unaligned refcount block goes unreported, as in qemu-img.
#[test]
fn a_backing_file_map_does_not_query_is_not_read_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "b.qcow2", "1M", &["write -P 1 0 64k"]);
    patch(p, "b.qcow2", REFTABLE, &(REFBLOCK + 0x200).to_be_bytes());
    qcow2_over(p, "b.qcow2", "t.qcow2", "1M", &["write -P 2 0 1M"]);
    for args in [
        &["map", "t.qcow2"][..],
        &["map", "--output=json", "t.qcow2"],
    ] {
        let (code, out, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
        assert_eq!(out, same(p, args));
    }
}

/// `commit` asks only the images above the base what they allocate, as qemu-img does: the
/// base's unaligned refcount block (never needed: the base is allocated where the top
/// writes) goes unreported, and both tools leave the same base.
#[test]
fn commit_does_not_query_the_base_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "b.qcow2", "1M", &["write -P 1 0 1M"]);
    patch(p, "b.qcow2", REFTABLE, &(REFBLOCK + 0x200).to_be_bytes());
    qcow2_over(p, "b.qcow2", "t.qcow2", "1M", &["write -P 2 0 64k"]);
    let mut outcomes = Vec::new();
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let dir = p.join(prog);
        std::fs::create_dir(&dir).unwrap();
        for name in ["b.qcow2", "t.qcow2"] {
            std::fs::copy(p.join(name), dir.join(name)).unwrap();
        }
        outcomes.push(run_with_stderr(&dir, tool, prog, &["commit", "t.qcow2"]));
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(outcomes[0].2, "");
    let (code, out) = qemu(p, &["compare", "qimg/b.qcow2", "qemu-img/b.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// A partial-cluster write over a backing file copies only what it does not overwrite, as
/// QEMU does: a write that replaces the backing file's only unreadable bytes succeeds (qimg
/// read the whole backing cluster and failed), and the overlays both tools leave agree.
#[test]
fn a_write_over_unreadable_backing_bytes_does_not_read_them_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &["write -P 8 0 2M"]);
    // Guest bytes [0, 4K) of the base, at host 0x50000 (after header, tables and L2).
    let bytes = std::fs::read(p.join("base.qcow2")).unwrap();
    let served = cowbird_tests::unreadable_file::UnreadableFile::new(bytes, 0x50000..0x51000);
    let served = served.path();
    let base = served.to_str().unwrap();
    let (code, out) = qemu(
        p,
        &[
            "create", "-f", "qcow2", "-b", base, "-F", "qcow2", "ov.qcow2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let args = ["bench", "-w", "-c", "1", "-s", "4k", "X"];
    let outcomes = run_on_copies(p, "ov.qcow2", &args, |_| ());
    for (code, _, err, ()) in &outcomes {
        assert_eq!(*code, 0, "{err}");
    }
    let (code, out) = qemu(p, &["compare", "qimg-ov.qcow2", "qemu-img-ov.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// An unreadable sector in the header cluster fails the open only where the header lies
/// (its fields, extensions, backing file name), as in qemu-img, which reads only those.
#[test]
fn an_unreadable_sector_of_the_header_cluster_matters_only_under_the_header_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "1M", &[]);
    qcow2_over(p, "base.qcow2", "ov.qcow2", "1M", &[]);
    let bytes = std::fs::read(p.join("ov.qcow2")).unwrap();
    let name_at = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    assert_eq!(
        name_at / 512,
        1,
        "the backing file name in the second sector"
    );
    // (bad range, whether the image opens).
    for (bad, opens) in [(0x8000..0x9000, true), (0x200..0x400, false)] {
        let served = cowbird_tests::unreadable_file::UnreadableFile::new(bytes.clone(), bad);
        let served = served.path();
        let img = served.to_str().unwrap();
        let ours = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &["info", "-U", img]);
        let theirs = run_with_stderr(p, "qemu-img", "qemu-img", &["info", "-U", img]);
        match opens {
            true => assert_eq!(ours, theirs),
            false => assert_eq!((ours.0, theirs.0), (1, 1), "{}", ours.2),
        }
    }
}

/// Metadata that cannot be read when the image is opened (failing media) fails the open
/// with qemu-img's words for what could not be read: the first sector when probing, the
/// header, the refcount table, the L1 table.
#[test]
fn unreadable_metadata_at_open_is_worded_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "a.qcow2");
    let bytes = std::fs::read(p.join("a.qcow2")).unwrap();
    // (bad page, -f given, the words).
    let cases = [
        (0, false, "Could not read image for determining its format"),
        (0, true, "Could not read qcow2 header"),
        (REFTABLE, true, "Could not initialize refcount handling"),
        (L1, true, "Could not read L1 table"),
    ];
    for (bad, format, words) in cases {
        let served =
            cowbird_tests::unreadable_file::UnreadableFile::new(bytes.clone(), bad..bad + 4096);
        let served = served.path();
        let img = served.to_str().unwrap();
        let args = match format {
            true => vec!["info", "-f", "qcow2", img],
            false => vec!["info", img],
        };
        let ours = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
        let theirs = run_with_stderr(p, "qemu-img", "qemu-img", &args);
        assert_eq!(ours, theirs, "{words}");
        let line = format!("PROG: Could not open '{img}': {words}: Input/output error\n");
        assert_eq!((ours.0, ours.2), (1, line));
    }
}

/// An image's allocation: `map --output=json` without host offsets, runs that differed
/// only in them joined.
fn allocation(dir: &Path, img: &str) -> Vec<serde_json::Value> {
    let (_, map) = qemu(dir, &["map", "--output=json", img]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut runs: Vec<serde_json::Value> = Vec::new();
    for mut run in map.as_array().unwrap().iter().cloned() {
        run.as_object_mut().unwrap().remove("offset");
        let flags = |r: &serde_json::Value| {
            let mut r = r.as_object().unwrap().clone();
            r.remove("start");
            r.remove("length");
            r
        };
        match runs.last_mut() {
            Some(last) if flags(last) == flags(&run) => {
                let length = last["length"].as_u64().unwrap() + run["length"].as_u64().unwrap();
                last["length"] = length.into();
            }
            _ => runs.push(run),
        }
    }
    runs
}

/// A rebase that copies data into the overlay allocates each new cluster after the L2
/// table that maps it, as QEMU does: the overlay is byte for byte qemu-img's.
#[test]
fn rebase_lays_new_clusters_out_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let writes = [
        "write -P 5 1000 3000",
        "write -P 6 200000 100",
        "write -P 7 3000000 70000",
    ];
    qcow2_image(p, &[], "old.qcow2", "4M", &writes);
    qcow2_image(p, &[], "new.qcow2", "4M", &[]);
    qcow2_over(p, "old.qcow2", "top.qcow2", "4M", &[]);
    let args = ["rebase", "-b", "new.qcow2", "-F", "qcow2", "X"];
    let outcomes = run_on_copies(p, "top.qcow2", &args, |copy| std::fs::read(p.join(copy)));
    assert_eq!(outcomes[0].0, 0, "{}", outcomes[0].2);
    assert_eq!(outcomes[1].0, 0, "{}", outcomes[1].2);
    assert!(
        outcomes[0].3.as_ref().unwrap() == outcomes[1].3.as_ref().unwrap(),
        "the overlays differ"
    );
}

/// Zero runs that `commit` copies into the base become zero clusters there, as with
/// qemu-img, also when they start off a cluster of the base: qimg's pieces used to cut them
/// inside clusters, which then held zeros as data.
#[test]
fn commit_leaves_zero_clusters_where_qemu_img_does() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let base = format!("{prog}-base.qcow2");
        qcow2_image(p, &[], &base, "2M", &["write -P 0x11 0 2M"]);
        let opts = ["-o", "cluster_size=4k", "-b", &base, "-F", "qcow2"];
        let top = format!("{prog}-top.qcow2");
        qcow2_image(p, &opts, &top, "2M", &["write -z -u 4k 1M"]);
        let (code, _, err) = run_with_stderr(p, tool, prog, &["commit", &top]);
        assert_eq!((code, err.as_str()), (0, ""), "{prog}");
    }
    assert_eq!(
        allocation(p, "qimg-base.qcow2"),
        allocation(p, "qemu-img-base.qcow2")
    );
    let (code, out) = qemu(p, &["compare", "qimg-base.qcow2", "qemu-img-base.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// A read error in the middle of a chain ends `commit` ("Block job failed") and a safe
/// `rebase` ("error while reading from old backing file", no system words) with qemu-img's
/// words.
#[test]
fn commit_and_rebase_read_errors_are_worded_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &["write -P 1 0 4M"]);
    let base = p.join("base.qcow2");
    let base = base.to_str().unwrap();
    qcow2_over(p, base, "mid.qcow2", "4M", &["write -P 2 0 1M"]);
    // The middle image's first data cluster, after its header, refcount table and block, L1
    // and L2 tables.
    let bytes = std::fs::read(p.join("mid.qcow2")).unwrap();
    let served = cowbird_tests::unreadable_file::UnreadableFile::new(bytes, 0x50000..0x51000);
    let served = served.path();
    qcow2_over(p, served.to_str().unwrap(), "top.qcow2", "4M", &[]);
    let cases = [
        (
            &["commit", "-b", base, "X"][..],
            "PROG: Block job failed: Input/output error\n",
        ),
        (
            &["rebase", "-F", "qcow2", "-b", base, "X"],
            "PROG: error while reading from old backing file\n",
        ),
    ];
    for (args, error) in cases {
        let outcomes = run_on_copies(p, "top.qcow2", args, |_| ());
        assert_eq!(outcomes[0], outcomes[1], "{args:?}");
        assert_eq!(
            (outcomes[0].0, outcomes[0].2.as_str()),
            (1, error),
            "{args:?}"
        );
    }
}

/// An unreadable bitmap table or bitmap data cluster fails every open, and an unreadable or
/// misaligned snapshot L1 table fails a view of the snapshot (`-l`), in qemu-img's words; a
/// snapshot L1 table past the end of the file reads as zeros, as in qemu-img.
#[test]
fn unreadable_bitmap_and_snapshot_tables_are_worded_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "4M", &["write -P 1 0 1M"]);
    qemu(p, &["bitmap", "--add", "a.qcow2", "b0"]);
    // A write the bitmap records: its first data cluster.
    qemu_io(p, "a.qcow2", &["write -P 2 0 64k"]);
    qemu(p, &["snapshot", "-c", "s1", "a.qcow2"]);
    let bytes = std::fs::read(p.join("a.qcow2")).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    // The bitmaps extension (magic 0x23852875) holds the directory's offset; the directory's
    // first entry starts with the table's offset.
    let ext = bytes
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap();
    let bitmap_table = be64(be64(ext + 24)) as u64;
    let bitmap_data = be64(bitmap_table as usize) as u64 & 0x00ff_ffff_ffff_fe00;
    let snapshot_l1 = be64(be64(64)) as u64;
    let cases: [(u64, &[&str], &str); 4] = [
        (
            bitmap_table,
            &["info", "IMG"],
            "Could not open 'IMG': Could not read bitmap_table table from image for bitmap \
             'b0': Input/output error",
        ),
        (
            bitmap_data,
            &["map", "IMG"],
            "Could not open 'IMG': Could not read bitmap 'b0' from image: Input/output error",
        ),
        (
            snapshot_l1,
            &["convert", "-l", "s1", "-O", "raw", "IMG", "out.raw"],
            "Failed to load snapshot: Failed to read l1 table for snapshot",
        ),
        (
            snapshot_l1,
            &["measure", "-l", "s1", "-O", "qcow2", "IMG"],
            "Failed to load snapshot: Failed to read l1 table for snapshot",
        ),
    ];
    for (bad, args, words) in cases {
        let served =
            cowbird_tests::unreadable_file::UnreadableFile::new(bytes.clone(), bad..bad + 4096);
        let served = served.path();
        let img = served.to_str().unwrap();
        let args: Vec<&str> = args
            .iter()
            .map(|&a| if a == "IMG" { img } else { a })
            .collect();
        let ours = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
        let theirs = run_with_stderr(p, "qemu-img", "qemu-img", &args);
        assert_eq!(ours, theirs, "{args:?}");
        let line = format!("PROG: {}\n", words.replace("IMG", img));
        assert_eq!((ours.0, ours.2), (1, line));
    }
    let snapshot_entry = be64(64) as u64;
    patch(
        p,
        "a.qcow2",
        snapshot_entry,
        &(snapshot_l1 + 0x200).to_be_bytes(),
    );
    let args = ["convert", "-l", "s1", "-O", "raw", "a.qcow2", "out.raw"];
    let ours = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
    assert_eq!(ours, run_with_stderr(p, "qemu-img", "qemu-img", &args));
    let line = "PROG: Failed to load snapshot: Snapshot L1 table offset invalid\n";
    assert_eq!((ours.0, ours.2.as_str()), (1, line));
    let past_the_end = std::fs::metadata(p.join("a.qcow2")).unwrap().len() + (1 << 20);
    let past_the_end = past_the_end & !0xffff;
    patch(p, "a.qcow2", snapshot_entry, &past_the_end.to_be_bytes());
    for args in [
        &["convert", "-l", "s1", "-O", "raw", "a.qcow2", "out.raw"][..],
        &["measure", "-l", "s1", "-O", "qcow2", "a.qcow2"],
    ] {
        let ours = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(ours, run_with_stderr(p, "qemu-img", "qemu-img", args));
        assert_eq!((ours.0, ours.2.as_str()), (0, ""), "{args:?}");
    }
    // Applying reads the zeros too (without the bitmap, which rules out applying);
    // deleting frees the table as qemu-img frees it.
    qemu(p, &["bitmap", "--remove", "a.qcow2", "b0"]);
    for args in [
        &["snapshot", "-a", "s1", "X"][..],
        &["snapshot", "-d", "s1", "X"],
    ] {
        let outcomes = run_on_copies(p, "a.qcow2", args, |copy| std::fs::read(p.join(copy)));
        assert_eq!(outcomes[0].0, 0, "{args:?}: {}", outcomes[0].2);
        assert_eq!(outcomes[1].0, 0, "{args:?}: {}", outcomes[1].2);
        // Including qcow2_free_clusters' complaint about the table it never counted.
        assert_eq!(outcomes[0].2, outcomes[1].2, "{args:?}");
        let images = ["qimg-a.qcow2", "qemu-img-a.qcow2"];
        assert_eq!(qemu(p, &["compare", images[0], images[1]]).0, 0, "{args:?}");
        assert_eq!(
            qemu(p, &["snapshot", "-l", images[0]]),
            qemu(p, &["snapshot", "-l", images[1]])
        );
    }
}

/// `args` (with the target named `X`) by both tools: the same exit code, output and errors;
/// a read error, or with `--salvage` a warning for each of the 8 sectors that fail and the
/// same target.
fn check_convert_of_unreadable_source(p: &Path, args: &[&str]) {
    let (ours, theirs) = (with_name(args, "ours.img"), with_name(args, "theirs.img"));
    let o = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &ours);
    let t = run_with_stderr(p, "qemu-img", "qemu-img", &theirs);
    assert_eq!(o, t, "{args:?}");
    match args.contains(&"--salvage") {
        false => {
            // After the 512-byte source, qemu-img's pieces start 512 bytes later.
            let piece = match args.iter().any(|a| a.starts_with("sector.")) {
                true => (6 << 20) + 512,
                false => 6 << 20,
            };
            let error = format!("PROG: error while reading at byte {piece}: Input/output error\n");
            assert_eq!((o.0, o.2.as_str()), (1, error.as_str()), "{args:?}");
        }
        true => {
            assert_eq!((o.0, o.2.lines().count()), (0, 8), "a warning per sector");
            assert_eq!(qemu(p, &["compare", "ours.img", "theirs.img"]).0, 0);
        }
    }
}

/// Block status that fails (corrupt metadata: an unaligned L2 entry) ends the comparison with
/// exit code 3, a read that fails (a compressed cluster that does not decompress) with 4,
/// in qemu-img's words, whichever image is the broken one.
#[test]
fn compare_fails_on_corrupt_images_with_qemu_img_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "good.qcow2");
    damaged(p, "u.qcow2", &[(L2, (1 << 63) | 0x50200, 8)], None);
    // measure words the failed block status as qemu-img does.
    same(p, &["measure", "-O", "qcow2", "u.qcow2"]);
    // map shows what comes before a broken entry (the one mapping 32 MiB), then fails.
    damaged(
        p,
        "u2.qcow2",
        &[(L2 + 512 * 8, (1 << 63) | 0x90200, 8)],
        None,
    );
    for output in ["--output=human", "--output=json"] {
        let map = same(p, &["map", output, "u2.qcow2"]);
        assert!(map.contains("262144") || map.contains("0x40000"), "{map}");
    }
    qcow2_image(p, &[], "text.qcow2", "1M", &["write -P 1 0 1M"]);
    raw_copy(p, "text.qcow2", "text.raw");
    assert_eq!(
        qemu(p, &["convert", "-c", "-O", "qcow2", "text.raw", "c.qcow2"]).0,
        0
    );
    patch(
        p,
        "c.qcow2",
        compressed_cluster_offset(p, "c.qcow2"),
        &[0xff; 64],
    );
    qcow2_image(p, &[], "e.qcow2", "1M", &[]);
    let cases: &[&[&str]] = &[
        &["u.qcow2", "good.qcow2"],
        &["good.qcow2", "u.qcow2"],
        &["-s", "u.qcow2", "good.qcow2"],
        &["-q", "good.qcow2", "u.qcow2"],
        &["c.qcow2", "text.raw"],
        &["text.raw", "c.qcow2"],
        &["e.qcow2", "c.qcow2"],
    ];
    for args in cases {
        same(p, &[&["compare"], *args].concat());
    }
    let (code, _, err) = run_with_stderr(
        p,
        "qemu-img",
        "qemu-img",
        &["compare", "u.qcow2", "good.qcow2"],
    );
    assert_eq!(code, 3, "{err}");
}

/// `-p` prints qemu-img's progress lines (in its steps, whatever stdout is), `-T` checks the
/// cache mode, `--image-opts` names the images by option strings, and what qimg cannot do
/// (`--object`) is refused with exit 2.
#[test]
fn compare_progress_and_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    compare_images(p);
    raw_copy(p, "a.qcow2", "a.raw");
    // 64 MiB of compressed clusters: qemu-img's runs are one cluster each.
    qcow2_image(p, &[], "t.qcow2", "64M", &["write -P 6 0 40M"]);
    raw_copy(p, "t.qcow2", "t.raw");
    assert_eq!(
        qemu(p, &["convert", "-c", "-O", "qcow2", "t.raw", "c.qcow2"]).0,
        0
    );
    // A hole of 1000 bytes (read as 1024), and an empty file.
    std::fs::File::create(p.join("hole.raw"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    std::fs::File::create(p.join("empty.raw")).unwrap();
    let cases: &[&[&str]] = &[
        &["-p", "empty.raw", "hole.raw"],
        &["-p", "-s", "empty.raw", "empty.raw"],
        &["-p", "a.qcow2", "a.qcow2"],
        &["-p", "a.qcow2", "a.raw"],
        &["-p", "a.qcow2", "b.qcow2"],
        &["-p", "a.raw", "longx.qcow2"],
        &["-p", "-s", "a.raw", "a.raw"],
        &["-p", "-s", "a.qcow2", "longx.qcow2"],
        &["-p", "c.qcow2", "t.raw"],
        &["--progress", "t.qcow2", "c.qcow2"],
        &["-pq", "a.qcow2", "longx.qcow2"],
        &["-p", "a.qcow2", "missing.qcow2"],
        &["-T", "bogus", "a.qcow2", "a.qcow2"],
        &["-p", "--cache=bogus", "a.qcow2", "a.qcow2"],
        &["-T", "none", "-U", "a.qcow2", "a.raw"],
        &["--image-opts", "-f", "qcow2", "a.qcow2", "a.qcow2"],
        &[
            "--image-opts",
            "file.filename=a.qcow2",
            "file.filename=a.qcow2",
        ],
        &[
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "driver=raw,file.filename=a.raw",
        ],
        &[
            "--image-opts",
            "driver=raw,file.filename=a.qcow2",
            "file.filename=a.raw",
        ],
        &["--image-opts", "a.qcow2", "a.raw"],
        &[r#"json:{"file":{"filename":"a.qcow2"}}"#, "file:a.raw"],
    ];
    for args in cases {
        same(p, &[&["compare"], *args].concat());
    }
    let args = [
        "compare",
        "--object",
        "secret,id=s0,data=x",
        "a.qcow2",
        "a.qcow2",
    ];
    let (code, out, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
    assert_eq!((code, out.as_str()), (2, ""), "{args:?}");
    assert!(err.contains("--object is not supported"), "{err}");
}

/// Both tools run `args` with an output file name appended and succeed, and their outputs
/// are the same byte for byte.
fn same_conversion(dir: &Path, args: &[&str]) {
    for (tool, out) in [
        (env!("CARGO_BIN_EXE_qimg"), "ours.raw"),
        ("qemu-img", "theirs.raw"),
    ] {
        assert_eq!(
            run(dir, tool, &[args, &[out]].concat()).0,
            0,
            "{tool} {args:?}"
        );
    }
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    assert!(read("ours.raw") == read("theirs.raw"), "{args:?}");
}

/// Images named by QEMU option strings (`--image-opts`, convert's `--target-image-opts`), by
/// `json:` pseudo-filenames and with the `file:` prefix, on the command line and as backing
/// files: the same output as qemu-img for each command that opens an image, the same changes
/// by the commands that write, and qemu-img's errors for the names it refuses too.
#[test]
fn image_opts_and_pseudo_filenames_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_chain(p, "");
    let names: [&[&str]; 5] = [
        &["--image-opts", "driver=qcow2,file.filename={X}"],
        &[
            "--image-opts",
            "file.driver=file,file.filename={X},driver=raw,driver=qcow2",
        ],
        &["--image-opts", "file.filename={X}"],
        &[r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"{X}"}}"#],
        &["file:{X}"],
    ];
    let readers: [&[&str]; 8] = [
        &["info"],
        &["info", "--output=json", "--backing-chain"],
        &["check"],
        &["check", "--output=json"],
        &["map"],
        &["map", "--output=json"],
        &["measure", "-O", "qcow2"],
        &["snapshot", "-l"],
    ];
    for name in names {
        let named: Vec<String> = name.iter().map(|a| a.replace("{X}", "top.qcow2")).collect();
        for cmd in readers {
            let args: Vec<&str> = cmd
                .iter()
                .copied()
                .chain(named.iter().map(|a| a.as_str()))
                .collect();
            same(p, &args);
        }
    }
    // Writers, each tool on its own copy: the same messages and the same image afterwards.
    qcow2_image(
        p,
        &[],
        "a.qcow2",
        "4M",
        &["write -P 1 0 1M", "write -P 2 2M 64k"],
    );
    let writers: [&[&str]; 8] = [
        &[
            "resize",
            "--image-opts",
            "driver=qcow2,file.filename={X}",
            "8M",
        ],
        &["bitmap", "--add", "--image-opts", "file.filename={X}", "b0"],
        &[
            "amend",
            "-o",
            "lazy_refcounts=on",
            r#"json:{"file.filename":"{X}"}"#,
        ],
        &["snapshot", "-c", "s1", "file:{X}"],
        &[
            "rebase",
            "-u",
            "-b",
            "",
            "--image-opts",
            "driver=qcow2,file.filename={X}",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "mid.qcow2",
            "driver=qcow2,file.filename={X}",
        ],
        &[
            "rebase",
            "-b",
            r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"}}"#,
            "-F",
            "qcow2",
            "X",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "--image-opts",
            "driver=raw,file.filename=mid.qcow2",
            "file:{X}",
        ],
    ];
    for args in writers {
        let outcomes = run_on_copies(p, "a.qcow2", args, |copy| {
            (qemu(p, &["check", copy]).0, info_sans_sizes(p, copy, copy))
        });
        let [ours, theirs] = &outcomes[..] else {
            unreachable!()
        };
        assert_eq!(ours.0, 0, "{args:?}: {}", ours.2);
        assert_eq!(ours, theirs, "{args:?}");
        let same_contents = qemu(p, &["compare", "qimg-a.qcow2", "qemu-img-a.qcow2"]);
        assert_eq!(same_contents.0, 0, "{args:?}: {}", same_contents.1);
    }
    // dd reads the image its if= names.
    for tool in [env!("CARGO_BIN_EXE_qimg"), "qemu-img"] {
        let args = [
            "dd",
            "--image-opts",
            "if=driver=qcow2,file.filename=top.qcow2",
            "of=dd.raw",
        ];
        let (code, _) = run(p, tool, &args);
        assert_eq!(code, 0, "{tool} {args:?}");
        assert_eq!(qemu(p, &["compare", "dd.raw", "top.qcow2"]).0, 0, "{tool}");
    }
    // Backing files named by pseudo-filenames (relative to the working directory, as QEMU
    // takes them): opened by create, read through by every reader, and by convert.
    let json = r#"json:{"driver":"qcow2","file":{"filename":"mid.qcow2"}}"#;
    same(
        p,
        &[
            "create", "-f", "qcow2", "-b", json, "-F", "qcow2", "c.qcow2",
        ],
    );
    same(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "file:c.qcow2",
            "-F",
            "qcow2",
            "d.qcow2",
        ],
    );
    same(p, &["info", "--backing-chain", "d.qcow2"]);
    std::fs::create_dir(p.join("sub")).unwrap();
    for (overlay, backing) in [
        (
            "sub/j.qcow2",
            r#"json:{"driver":"qcow2","file":{"filename":"mid.qcow2"}}"#,
        ),
        ("sub/f.qcow2", "file:mid.qcow2"),
    ] {
        let create = [
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
        ];
        assert_eq!(qemu(p, &[&create[..], &[overlay, "6M"]].concat()).0, 0);
        qemu_io(p, overlay, &["write -P 9 1M 64k"]);
        for cmd in readers {
            same(p, &[cmd, &[overlay]].concat());
        }
        same(p, &["compare", overlay, "top.qcow2"]);
        same_conversion(p, &["convert", "-O", "raw", overlay]);
    }
    // Names qemu-img refuses as well, in its words.
    for args in [
        &[
            "info",
            "-f",
            "qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
        ][..],
        &["info", "--image-opts", "top.qcow2"],
        &["info", "--image-opts", "driver=qcow2"],
        &["info", "--image-opts", "driver=qcow2,filename=top.qcow2"],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,filename=x",
        ],
        &[
            "check",
            "--image-opts",
            "driver=qcow2,file.driver=host_device,file.filename=top.qcow2",
        ],
        &["map", "json:[1]"],
        &[
            "compare",
            "--image-opts",
            "file.filename=top.qcow2",
            "file.filename=nope.qcow2",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=nope.qcow2",
        ],
        &["check", r#"json:{"file":{"filename":"nope.qcow2"}}"#],
        &["map", "json:{}"],
        &["map", r#"json:{"driver":"qcow2","file":"top.qcow2"}"#],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,driver=raw",
        ],
    ] {
        same(p, args);
    }
}

/// What a pseudo-filename cannot override or smuggle in, as in qemu-img: `-f`/`-F`/`-O` and
/// a recorded backing format win over a `json:` driver; a name is resolved once (`file:file:x`
/// names the file `file:x`); files to create take `file:` but no other protocol; a `json:`
/// object with a key twice, an `id`, an unknown protocol (also in a backing name) are refused;
/// `--target-image-opts` without a driver probes the target; `commit -b` finds a base as
/// qemu-img does.
#[test]
fn pseudo_filenames_keep_qemu_img_precedence_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_chain(p, "");
    raw_copy(p, "top.qcow2", "top.raw");
    std::fs::write(p.join("x.img"), vec![7u8; 2 << 20]).unwrap();
    std::fs::write(p.join("file:x.img"), vec![8u8; 3 << 20]).unwrap();
    let json = |driver: &str, file: &str| {
        format!(r#"json:{{"driver":"{driver}","file":{{"filename":"{file}"}}}}"#)
    };
    let (jq_top, jr_mid) = (json("qcow2", "top.qcow2"), json("raw", "mid.qcow2"));
    // An overlay whose header says qcow2 for a json: backing name saying raw, and one whose
    // backing name has a protocol QEMU does not know.
    for (overlay, backing) in [
        ("mism.qcow2", jr_mid.as_str()),
        ("colon.qcow2", "x:y.qcow2"),
    ] {
        let create = [
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
        ];
        assert_eq!(qemu(p, &[&create[..], &[overlay, "4M"]].concat()).0, 0);
    }
    qemu_io(p, "mism.qcow2", &["write -P 6 0 64k"]);
    std::fs::copy(p.join("mid.qcow2"), p.join("x:y.qcow2")).unwrap();
    let jq_new = json("qcow2", "new.qcow2");
    let dup = r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"},"driver":"raw"}"#;
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", "-f", "raw", &jq_top],
        vec!["measure", "-O", "qcow2", "-f", "raw", &jq_top],
        vec!["compare", "-F", "raw", "top.qcow2", &jq_top],
        vec!["info", "--backing-chain", "mism.qcow2"],
        vec!["map", "--output=json", "mism.qcow2"],
        vec!["compare", "mism.qcow2", "top.qcow2"],
        vec!["info", "file:file:x.img"],
        vec![
            "info",
            "--image-opts",
            "driver=raw,file.filename=file:x.img",
        ],
        vec![
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "file:file:x.img",
            "x.img",
        ],
        vec!["info", dup],
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,id=x",
        ],
        vec!["info", "x:y.qcow2"],
        vec!["info", "--backing-chain", "colon.qcow2"],
        vec!["map", "colon.qcow2"],
        vec!["compare", "colon.qcow2", "mid.qcow2"],
        vec!["create", "-f", "qcow2", &jq_new, "1M"],
        vec!["convert", "-O", "qcow2", "top.qcow2", &jq_new],
        vec!["dd", "if=top.qcow2", "bs=64k", "count=1", "of=x:new.raw"],
        vec![
            "convert",
            "-n",
            "-O",
            "raw",
            "--target-image-opts",
            "top.qcow2",
            "driver=raw,file.filename=x.img",
        ],
        vec!["commit", "-b", "base.qcow2", "mism.qcow2"],
        vec!["compare", "-F", "qcow2", "file:top.raw", "top.raw"],
    ];
    for args in &cases {
        same(p, args);
    }
    assert!(!p.join(&jq_new).exists() && !p.join("x:new.raw").exists());
    // Sources of different formats, each named with its own.
    let jr_top = json("raw", "top.qcow2");
    same_conversion(p, &["convert", "-O", "raw", "top.qcow2", &jr_top]);
    // Files created through `file:` are the files it names.
    for args in [
        &["create", "-f", "qcow2", "file:c.qcow2", "1M"][..],
        &["convert", "-O", "raw", "top.qcow2", "file:c.raw"],
        &["dd", "if=top.qcow2", "bs=64k", "count=1", "of=file:d.raw"],
    ] {
        same(p, args);
    }
    for made in ["c.qcow2", "c.raw", "d.raw"] {
        assert!(p.join(made).exists(), "{made}");
    }
    // Writers on copies: -f wins over the name's driver; the probed target of
    // --target-image-opts stays qcow2.
    let writers: [&[&str]; 3] = [
        &[
            "resize",
            "-f",
            "raw",
            r#"json:{"driver":"qcow2","file":{"filename":"{X}"}}"#,
            "8M",
        ],
        &[
            "snapshot",
            "-c",
            "s1",
            "-f",
            "raw",
            r#"json:{"driver":"qcow2","file":{"filename":"{X}"}}"#,
        ],
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            "top.raw",
            "file.filename={X}",
        ],
    ];
    for args in writers {
        let outcomes = run_on_copies(p, "top.qcow2", args, |copy| {
            let info = qemu(p, &["info", "-f", "raw", copy]);
            (
                info.0,
                info.1.replace(copy, "X"),
                std::fs::read(p.join(copy)).unwrap().len(),
            )
        });
        assert_eq!(outcomes[0], outcomes[1], "{args:?}");
    }
    // A json: name whose file sits under a directory named like a protocol: its backing
    // file's name is joined to it and read again as QEMU reads it (`file:d/base.qcow2` is
    // d/base.qcow2), by the library (convert) as by the chain walks (map).
    for dir in ["file:d", "d"] {
        std::fs::create_dir(p.join(dir)).unwrap();
        std::fs::copy(p.join("base.qcow2"), p.join(dir).join("base.qcow2")).unwrap();
    }
    qemu_io(p, "d/base.qcow2", &["write -P 11 0 64k"]);
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
    ];
    assert_eq!(qemu(p, &[&create[..], &["./file:d/m.qcow2"]].concat()).0, 0);
    let jm = r#"json:{"file":{"filename":"file:d/m.qcow2"}}"#;
    same(p, &["map", jm]);
    same_conversion(p, &["convert", "-O", "raw", jm]);
    // convert -n without -O writes raw whatever a json: target's driver says; a bitmap merge
    // source and a data file are named as qemu-img names them.
    let jx = r#"json:{"driver":"qcow2","file":{"filename":"{X}"}}"#;
    let args = ["convert", "-n", "top.raw", jx];
    let outcomes = run_on_copies(p, "top.qcow2", &args, |copy| {
        std::fs::read(p.join(copy)).unwrap()
    });
    assert!(outcomes[0] == outcomes[1], "{args:?}");
    qcow2_image(p, &[], "bm.qcow2", "6M", &[]);
    assert_eq!(qemu(p, &["bitmap", "--add", "bm.qcow2", "b0"]).0, 0);
    qemu_io(p, "bm.qcow2", &["write -P 1 1M 64k"]);
    std::fs::write(p.join("file:bm.qcow2"), b"not an image").unwrap();
    let merge = [
        "bitmap",
        "--add",
        "X",
        "d",
        "--merge",
        "b0",
        "-b",
        "file:bm.qcow2",
        "-F",
        "qcow2",
    ];
    let outcomes = run_on_copies(p, "top.qcow2", &merge, |copy| dirty_map(p, copy, "d"));
    assert_eq!(outcomes[0], outcomes[1], "{merge:?}");
    assert_eq!(outcomes[0].0, 0, "{}", outcomes[0].2);
    std::fs::create_dir(p.join("sub")).unwrap();
    for args in [
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=file:df.raw",
            "df.qcow2",
            "1M",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=x:df.raw",
            "dx.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=dsub.raw",
            "sub/ds.qcow2",
            "1M",
        ],
        &["info", "df.qcow2"],
        &["map", "--output=json", "sub/ds.qcow2"],
    ] {
        same(p, args);
    }
    assert!(p.join("df.raw").exists() && !p.join("file:df.raw").exists());
    // A relative data file name is relative to the working directory, as QEMU takes it.
    assert!(p.join("dsub.raw").exists() && !p.join("sub/dsub.raw").exists());
    // A non-string value is refused by both (in other words).
    for tool in [env!("CARGO_BIN_EXE_qimg"), "qemu-img"] {
        let number = r#"json:{"driver":"qcow2","file":{"filename":1}}"#;
        assert_eq!(run(p, tool, &["info", number]).0, 1, "{tool}");
    }
}

/// Sparse 100 GiB images are compared through their block status: only their few MiB of data
/// are read (reading them whole took minutes).
#[test]
fn compare_skips_the_holes_of_sparse_100g_images() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let data = ["write -P 1 0 1M", "write -P 2 50G 1M", "write -P 3 99G 64k"];
    qcow2_image(p, &[], "s.qcow2", "100G", &data);
    qcow2_image(
        p,
        &[],
        "t.qcow2",
        "100G",
        &[&data[..], &["write -P 9 70G 512"]].concat(),
    );
    // Extended L2 entries (runs of subclusters): 10 GiB, then the rest of the others.
    qcow2_image(p, &["-o", "extended_l2=on"], "x.qcow2", "10G", &data[..1]);
    raw_copy(p, "s.qcow2", "s.raw");
    let cases: &[&[&str]] = &[
        &["s.qcow2", "s.raw"],
        &["s.raw", "x.qcow2"],
        &["s.qcow2", "t.qcow2"],
        &["-p", "s.qcow2", "s.raw"],
        &["x.qcow2", "s.qcow2"],
        &["-p", "t.qcow2", "x.qcow2"],
        &["-s", "s.qcow2", "s.qcow2"],
        &["-s", "s.qcow2", "t.qcow2"],
    ];
    for args in cases {
        let args = [&["compare"], *args].concat();
        same(p, &args);
        // Reading 100 GiB, even of holes, takes tens of CPU seconds.
        let cpu = qimg_cpu_seconds(p, &args);
        assert!(cpu < 2.0, "{args:?} took {cpu} CPU seconds");
    }
}

/// The user and system CPU seconds qimg takes to run `args`.
fn qimg_cpu_seconds(dir: &Path, args: &[&str]) -> f64 {
    let children = || {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
            0
        );
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    let before = children();
    qimg(dir, args);
    children() - before
}

/// Runs `args` through both tools with `X` replaced by a per-tool copy of `img` (made
/// first), compares stdout and exit code, and returns the two copies' names.
fn same_on_copies(dir: &Path, img: &str, args: &[&str]) -> (String, String) {
    let ours = format!("ours-{img}");
    let theirs = format!("theirs-{img}");
    std::fs::copy(dir.join(img), dir.join(&ours)).unwrap();
    std::fs::copy(dir.join(img), dir.join(&theirs)).unwrap();
    let o = qimg(dir, &with_name(args, &ours));
    let t = qemu(dir, &with_name(args, &theirs));
    assert_eq!(o, t, "qimg vs qemu-img differ for {args:?} on {img}");
    (ours, theirs)
}

/// Images of many kinds, made by both tools, in `dir` (some in a subdirectory).
fn make_zoo(p: &Path) -> Vec<&'static str> {
    std::fs::create_dir(p.join("d")).unwrap();
    qcow2_image(
        p,
        &[],
        "a.qcow2",
        "64M",
        &[
            "write -P 1 0 100k",
            "write -c -P 2 1M 64k",
            "write -z 2M 64k",
            "write -P 3 3M 64k",
            "write -z -u 3M 64k",
        ],
    );
    qemu(p, &["snapshot", "-c", "snap1", "a.qcow2"]);
    qemu(p, &["bitmap", "--add", "a.qcow2", "bm0"]);
    qemu(
        p,
        &[
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--disable",
            "a.qcow2",
            "bm1",
        ],
    );
    qcow2_image(p, &[], "d/base.qcow2", "2M", &["write -P 4 0 1M"]);
    qimg_qcow2(
        p,
        &["-b", "base.qcow2", "-F", "qcow2"],
        "d/top.qcow2",
        "4M",
        &["write -P 5 512k 64k"],
    );
    qimg_qcow2(
        p,
        &["-o", "compat=0.10,cluster_size=4096"],
        "v2.qcow2",
        "1G",
        &[],
    );
    qimg_qcow2(
        p,
        &["-o", "data_file=ext.data,data_file_raw=on"],
        "ext.qcow2",
        "1M",
        &[],
    );
    qimg_qcow2(
        p,
        &["-o", "preallocation=metadata"],
        "pm.qcow2",
        "3M",
        &["write -P 1 64k 4k", "write -z 1M 64k"],
    );
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    qimg(p, &["create", "-q", "-f", "raw", "q.raw", "2M"]);
    let _ = run(
        p,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 100k 8k", "q.raw"],
    );
    std::fs::write(p.join("odd.raw"), [1u8; 1000]).unwrap();
    make_dirty_qcow2(p, "dirty.qcow2");
    make_extended_l2(p);
    vec![
        "a.qcow2",
        "d/base.qcow2",
        "d/top.qcow2",
        "v2.qcow2",
        "ext.qcow2",
        "pm.qcow2",
        "r.raw",
        "q.raw",
        "odd.raw",
        "dirty.qcow2",
        "xl2.qcow2",
        "d/xl2top.qcow2",
    ]
}

/// Images with extended L2 entries: `xl2.qcow2` (qemu-img's, with subcluster writes, zero
/// subclusters and a compressed cluster) and `d/xl2top.qcow2` (ours, over `d/xbase.qcow2`:
/// its untouched subclusters show the backing file).
fn make_extended_l2(p: &Path) {
    std::fs::create_dir_all(p.join("d")).unwrap();
    qcow2_image(p, &[], "d/xbase.qcow2", "2M", &["write -P 4 0 1M"]);
    qcow2_image(
        p,
        &["-o", "extended_l2=on"],
        "xl2.qcow2",
        "4M",
        &[
            "write -P 1 4k 4k",
            "write -P 2 70000 3000",
            "write -z 6k 2k",
            "write -z 1M 64k",
            "write -c -P 3 2M 64k",
            "write -P 4 3M 1k",
        ],
    );
    qimg_qcow2(
        p,
        &["-o", "extended_l2=on", "-b", "xbase.qcow2", "-F", "qcow2"],
        "d/xl2top.qcow2",
        "4M",
        &[
            "write -P 5 4k 2k",
            "write -z 100k 8k",
            "write -P 6 1500k 1M",
        ],
    );
}

#[test]
fn info_json_and_backing_chains_match() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for img in make_zoo(p) {
        for out in ["--output=human", "--output=json"] {
            same(p, &["info", out, img]);
            same(p, &["info", "-U", "--backing-chain", out, img]);
        }
    }
    assert!(same(p, &["info", "--output=json", "a.qcow2"]).contains("\"bitmaps\""));
    same(p, &["info", "-f", "qcow2", "r.raw"]);
    same(p, &["info", "missing.qcow2"]);
    same(p, &["info", "--output=xml", "a.qcow2"]);
}

#[test]
fn info_prints_sizes_near_unit_boundaries_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // QEMU moves to the next unit once three digits would reach 1000: "0.977 MiB", and
    // "1e+03 KiB" just below.
    for size in [
        "1023488", "1024000", "1047552", "1048576", "10239k", "1000M", "1023M",
    ] {
        let raw = format!("{size}.raw");
        same(p, &["create", "-q", "-f", "raw", &raw, size]);
        same(p, &["info", &raw]);
        let qcow2 = format!("{size}.qcow2");
        same(p, &["create", "-q", "-f", "qcow2", &qcow2, size]);
        same(p, &["info", &qcow2]);
    }
}

#[test]
fn map_matches_in_both_forms() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for img in make_zoo(p) {
        for out in ["--output=human", "--output=json"] {
            same(p, &["map", out, img]);
            same(
                p,
                &[
                    "map",
                    out,
                    "--start-offset",
                    "1000",
                    "--max-length",
                    "70000",
                    img,
                ],
            );
            same(p, &["map", out, "-s", "64k", "-l", "1M", img]);
        }
    }
    same(p, &["map", "-s", "1x", "a.qcow2"]);
    same(p, &["map", "missing.qcow2"]);
    // Runs of data around the clusters block status decodes first (32) and across L2
    // slices (512 entries of 4 KiB clusters), with and without subclusters; zero clusters
    // that keep their host cluster (with an offset) next to ones that do not: separate runs.
    let runs: &[&str] = &[
        "write -P 1 0 124k",
        "write -P 2 128k 128k",
        "write -P 3 260k 132k",
        "write -P 4 1984k 200k",
        "write -z 2500k 300k",
        "write -P 5 3M 1M",
    ];
    let zeros: &[&str] = &[
        "write -P 1 0 256k",
        "write -z 0 64k",
        "write -z -u 64k 64k",
        "write -z 128k 64k",
    ];
    for (name, opts, writes) in [
        ("runs.qcow2", "cluster_size=4k", runs),
        ("runs-xl2.qcow2", "cluster_size=64k,extended_l2=on", runs),
        ("zeros.qcow2", "cluster_size=64k", zeros),
        ("zeros-xl2.qcow2", "cluster_size=64k,extended_l2=on", zeros),
    ] {
        qcow2_image(p, &["-o", opts], name, "8M", writes);
        for out in ["--output=human", "--output=json"] {
            same(p, &["map", out, name]);
        }
        same(p, &["measure", "-O", "qcow2", name]);
    }
    // A raw backing file of 1000 bytes under a 64 KiB overlay: its sector-rounded tail
    // (24 bytes of zeros) is its last run; past it nothing is present.
    std::fs::write(p.join("odd.raw"), [1u8; 1000]).unwrap();
    let over_odd = ["-b", "odd.raw", "-F", "raw"];
    qcow2_image(p, &over_odd, "over-odd.qcow2", "64k", &[]);
    for out in ["--output=human", "--output=json"] {
        same(p, &["map", out, "over-odd.qcow2"]);
    }
}

#[test]
fn measure_matches_for_sizes_and_images() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let zoo = make_zoo(p);
    for img in &zoo {
        for o in [
            &["-O", "qcow2"][..],
            &["-O", "raw"],
            &["-O", "qcow2", "-o", "cluster_size=4k,compat=0.10"],
        ] {
            let mut a = vec!["measure"];
            a.extend(o);
            a.push(img);
            same(p, &a);
        }
    }
    for args in [
        &["--size", "10G", "-O", "qcow2"][..],
        &["--size", "1000"],
        &["--size", "1000", "-O", "qcow2"],
        &["--output=json", "--size", "1G"],
        &["--output=json", "-O", "qcow2", "a.qcow2"],
        &["--size", "10G", "-O", "qcow2", "-o", "cluster_size=4096"],
        &["--size", "10G", "-O", "qcow2", "-o", "preallocation=full"],
        &[
            "--size",
            "10G",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ],
        &[
            "--size",
            "100G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=512",
        ],
        &["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"],
        &["-O", "qcow2", "-o", "backing_file=a.qcow2", "d/top.qcow2"],
        &["--size", "1P", "-O", "qcow2", "-o", "cluster_size=512"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"],
        &["--size", "1G", "a.qcow2"],
        &[],
    ] {
        let mut a = vec!["measure"];
        a.extend(args);
        same(p, &a);
    }
}

#[test]
fn resize_matches_and_keeps_images_consistent() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &[],
        "q.qcow2",
        "64M",
        &[
            "write -P 5 0 300k",
            "write -P 6 10M 64k",
            "write -c -P 7 20M 64k",
        ],
    );
    qcow2_image(
        p,
        &["-o", "cluster_size=512"],
        "small.qcow2",
        "64M",
        &["write -P 5 0 300k", "write -P 6 10M 64k"],
    );
    qimg_qcow2(
        p,
        &["-o", "cluster_size=4096"],
        "ours.qcow2",
        "1M",
        &["write -P 8 4k 8k"],
    );
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    qcow2_image(
        p,
        &[],
        "snap.qcow2",
        "64M",
        &[
            "write -P 5 0 300k",
            "write -P 6 10M 64k",
            "write -P 6 40M 64k",
        ],
    );
    qemu(p, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_io(p, "snap.qcow2", &["write -P 9 10M 4k"]);
    // (image, size argument, extra options, layouts identical)
    let cases: &[(&str, &str, &[&str], bool)] = &[
        ("q.qcow2", "+1G", &[], true),
        ("q.qcow2", "200G", &[], true),
        ("q.qcow2", "5M", &["--shrink"], true),
        ("q.qcow2", "-50M", &["--shrink"], true),
        ("small.qcow2", "100k", &["--shrink"], true),
        ("small.qcow2", "1G", &[], true),
        ("ours.qcow2", "2T", &[], true),
        ("q.qcow2", "1G", &["--preallocation=metadata"], false),
        ("q.qcow2", "+3M", &["--preallocation=falloc"], false),
        ("q.qcow2", "+3M", &["--preallocation=full"], false),
        ("snap.qcow2", "+1G", &[], true),
        ("snap.qcow2", "5M", &["--shrink"], true),
        ("r.raw", "+1M", &[], true),
        ("r.raw", "1000", &["--shrink"], true),
        (
            "r.raw",
            "+1M",
            &["--preallocation=falloc", "-f", "raw"],
            true,
        ),
    ];
    for (img, size, opts, identical) in cases {
        let mut a = vec!["resize"];
        a.extend(*opts);
        a.extend(["X", size]);
        let (ours, theirs) = same_on_copies(p, img, &a);
        assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0, "{a:?} {img}");
        if img.ends_with("qcow2") {
            let (code, check) = qemu(p, &["check", "--output=json", &ours]);
            assert_eq!(code, 0, "{a:?} {img}: {check}");
            if *identical {
                assert_eq!(
                    check.replace(&ours, "X"),
                    qemu(p, &["check", "--output=json", &theirs])
                        .1
                        .replace(&theirs, "X"),
                    "{a:?} {img}"
                );
                assert_eq!(
                    qemu(p, &["map", "--output=json", &ours]),
                    qemu(p, &["map", "--output=json", &theirs]),
                    "{a:?} {img}"
                );
            }
        }
        assert_eq!(
            info_sans_sizes(p, &ours, &ours),
            info_sans_sizes(p, &theirs, &theirs),
            "{a:?} {img}"
        );
    }
    for args in [
        &["resize", "X", "1M"][..],
        &["resize", "X", "0"],
        &["resize", "X", "--", "-1G"],
        &["resize", "--shrink", "--preallocation=full", "X", "1M"],
        &["resize", "--preallocation=bogus", "X", "+1M"],
        &["resize", "--preallocation=metadata", "X", "+0"],
        &["resize", "-q", "X", "+1M"],
        &["resize", "X"],
    ] {
        same_on_copies(p, "q.qcow2", args);
    }
    same(p, &["resize", "missing.qcow2", "1G"]);
    // A raw file of a partial sector: QEMU sees it in whole sectors.
    std::fs::write(p.join("odd.raw"), [7u8; 1000]).unwrap();
    let (ours, theirs) = same_on_copies(p, "odd.raw", &["resize", "-f", "raw", "X", "+0"]);
    assert_eq!(
        std::fs::read(p.join(ours)).unwrap(),
        std::fs::read(p.join(theirs)).unwrap()
    );
    // Snapshots survive a shrink: their data is intact in both.
    let (ours, theirs) = same_on_copies(p, "snap.qcow2", &["resize", "--shrink", "X", "1M"]);
    for img in [&ours, &theirs] {
        assert_eq!(qemu(p, &["snapshot", "-a", "s1", img]).0, 0);
    }
    assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0);
    assert_eq!(qemu(p, &["check", &ours]).0, 0);
}

/// The names of the persistent bitmaps of `img`, as qemu-img info lists them.
fn bitmap_names(dir: &Path, img: &str) -> Vec<String> {
    let (code, out) = qemu(dir, &["info", "--output=json", img]);
    assert_eq!(code, 0, "{out}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    let names = bitmaps
        .as_array()
        .map(|b| b.iter().map(|b| b["name"].to_string()).collect());
    names.unwrap_or_default()
}

/// rebase and commit keep the images' persistent dirty bitmaps, marking what they write into
/// the enabled ones, as qemu-img does (they cleared the bitmaps' autoclear bit and leaked
/// their clusters): a top with a bitmap rebased onto another image, then committed into it
/// (which has a bitmap too): the same bitmaps, the same dirty maps as QEMU reads them.
#[test]
fn commit_and_rebase_keep_persistent_bitmaps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for tool in ["qimg", "qemu-img"] {
        let (base, top, other) = (
            format!("{tool}-base.qcow2"),
            format!("{tool}-top.qcow2"),
            format!("{tool}-other.qcow2"),
        );
        qcow2_image(p, &[], &base, "4M", &["write -P 1 0 64k"]);
        qemu(p, &["bitmap", "--add", &base, "bb"]);
        qcow2_over(p, &base, &top, "4M", &["write -P 2 1M 64k"]);
        qemu(p, &["bitmap", "--add", &top, "tb"]);
        qemu_io(p, &top, &["write -P 3 2M 64k"]);
        qcow2_image(p, &[], &other, "4M", &["write -P 4 3M 64k"]);
        qemu(p, &["bitmap", "--add", &other, "ob"]);
        let bin = match tool {
            "qimg" => env!("CARGO_BIN_EXE_qimg"),
            _ => "qemu-img",
        };
        let (code, out) = run(p, bin, &["rebase", "-b", &other, "-F", "qcow2", &top]);
        assert_eq!(code, 0, "{tool} rebase: {out}");
        let (code, out) = run(p, bin, &["commit", &top]);
        assert_eq!(code, 0, "{tool} commit: {out}");
    }
    for img in ["top", "other"] {
        let (ours, theirs) = (format!("qimg-{img}.qcow2"), format!("qemu-img-{img}.qcow2"));
        assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0, "{img}");
        assert_eq!(
            qemu(p, &["check", &ours]).0,
            0,
            "{img}: qimg's image checks clean"
        );
        assert_eq!(bitmap_names(p, &ours), bitmap_names(p, &theirs), "{img}");
    }
    assert_eq!(bitmap_names(p, "qimg-top.qcow2"), ["\"tb\""]);
    assert_eq!(bitmap_names(p, "qimg-other.qcow2"), ["\"ob\""]);
    // The rebase's copies marked in the top's bitmap, the commit's writes in the base's.
    for (img, bitmap) in [("top", "tb"), ("other", "ob")] {
        assert_eq!(
            dirty_map(p, &format!("qimg-{img}.qcow2"), bitmap),
            dirty_map(p, &format!("qemu-img-{img}.qcow2"), bitmap),
            "dirty map of {bitmap} in {img}"
        );
    }
}

/// The dirty map of persistent bitmap `bitmap` of `img` as QEMU reads it: the image exported
/// over NBD by qemu-storage-daemon with the bitmap, mapped by qemu-img (dirty ranges show
/// as `"data": false`).
fn dirty_map(dir: &Path, img: &str, bitmap: &str) -> String {
    let socket = dir.join(format!("nbd-{img}.sock"));
    let mut qsd = Command::new("qemu-storage-daemon")
        .current_dir(dir)
        .args([
            "--blockdev",
            &format!("driver=file,filename={img},node-name=f,read-only=on"),
            "--blockdev",
            "driver=qcow2,file=f,node-name=q,read-only=on",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", socket.display()),
            "--export",
            &format!("type=nbd,id=e,node-name=q,name=q,bitmaps.0={bitmap}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run qemu-storage-daemon");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=q,\
         x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        socket.display()
    );
    let map = qemu(dir, &["map", "--output=json", "--image-opts", &opts]);
    let _ = qsd.kill();
    let _ = qsd.wait();
    let _ = std::fs::remove_file(&socket);
    assert_eq!(map.0, 0, "qemu-img map of bitmap {bitmap} in {img}");
    map.1
}

/// `qimg bitmap` adds, removes, clears, enables, disables and merges bitmaps as qemu-img
/// does, its actions in command-line order: the same output and exit code, the same
/// bitmaps (names, granularities, flags, and the dirty ranges QEMU reads from them), and
/// images that check clean.
#[test]
fn bitmap_changes_bitmaps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &["-o", "cluster_size=4k"], "bm.qcow2", "64M", &[]);
    qemu(p, &["bitmap", "--add", "-g", "4k", "bm.qcow2", "some"]);
    let writes = [
        "write 0 1k",
        "write 5M 300k",
        "write 40M 4k",
        "write 64508k 4k",
    ];
    qemu_io(p, "bm.qcow2", &writes);
    qemu(p, &["bitmap", "--disable", "bm.qcow2", "some"]);
    qemu(p, &["bitmap", "--add", "-g", "64k", "bm.qcow2", "all"]);
    qemu_io(p, "bm.qcow2", &["write 0 64M"]);
    qcow2_image(p, &[], "other.qcow2", "64M", &[]);
    qemu(p, &["bitmap", "--add", "other.qcow2", "elsewhere"]);
    qemu_io(p, "other.qcow2", &["write 1M 1M"]);
    let cases: &[(&[&str], &str)] = &[
        (&["--add", "-g", "128k", "--merge", "some"], "new"),
        (
            &["--add", "-g", "512", "--merge", "some", "--merge", "all"],
            "new",
        ),
        (
            &["--add", "--merge", "elsewhere", "-b", "other.qcow2"],
            "new",
        ),
        (&["--merge", "some", "--disable"], "all"),
        (&["--clear", "--enable"], "some"),
        (&["--add", "--remove", "--add", "--disable"], "new"),
        (&["--remove"], "all"),
        (&["--add", "--add"], "new"),
        (&["--merge", "missing"], "some"),
        // Both missing: the target is looked up first.
        (&["--merge", "missing"], "absent"),
        (&["--merge", "missing", "-b", "other.qcow2"], "absent"),
        (
            &["--merge", "elsewhere", "-b", "other.qcow2", "-F", "qcow2"],
            "some",
        ),
        (&["--enable"], "missing"),
        (&["--add", "-g", "3k"], "new"),
        (&["-g", "64k", "--clear"], "some"),
        (&[], "some"),
        (&["--add"], ""),
    ];
    for (ops, bitmap) in cases {
        let args = [&["bitmap"], *ops, &["X", bitmap]].concat();
        let results = run_on_copies(p, "bm.qcow2", &args, |img| {
            let info = info_sans_sizes(p, img, img);
            let maps: Vec<String> = ["some", "all", "new"]
                .iter()
                .filter(|b| info.contains(&format!("name: {b}\n")))
                .map(|b| format!("{b}: {}", dirty_map(p, img, b)))
                .collect();
            (qemu(p, &["check", img]).0, info, maps)
        });
        assert_eq!(results[0], results[1], "{ops:?} on {bitmap}");
        assert_eq!(results[0].3 .0, 0, "{ops:?}: qemu-img check");
    }
    // Both in use (qemu-io killed with them loaded): the target's state is reported first.
    qcow2_image(p, &[], "inuse.qcow2", "1M", &[]);
    for name in ["T", "S"] {
        assert_eq!(qemu(p, &["bitmap", "--add", "inuse.qcow2", name]).0, 0);
    }
    let kill = ["-c", "write 0 64k", "-c", "sigraise 9", "inuse.qcow2"];
    let _ = run(p, "qemu-io", &kill);
    let results = run_on_copies(
        p,
        "inuse.qcow2",
        &["bitmap", "--merge", "S", "X", "T"],
        |_| (),
    );
    assert_eq!(results[0], results[1]);
    assert!(
        results[0].2.contains("Bitmap 'T' is inconsistent"),
        "{}",
        results[0].2
    );
    // The merges had dirty ranges to merge.
    assert!(dirty_map(p, "bm.qcow2", "some")
        .contains("\"start\": 5242880, \"length\": 307200, \"depth\": 0, \"present\": false"));
}

/// `-r` throttles what convert and commit write (the result unchanged), and bad rates get
/// qemu-img's errors.
#[test]
fn rate_limits_throttle_convert_and_commit() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &[],
        "src.qcow2",
        "16M",
        &["write -P 7 0 2M", "write -P 8 8M 2M"],
    );
    for args in [
        &["convert", "-r", "x", "-O", "raw", "src.qcow2", "o.raw"][..],
        &["convert", "-r", "-1", "-O", "raw", "src.qcow2", "o.raw"],
        &["commit", "-r", "1k", "src.qcow2"],
    ] {
        same(p, args);
    }
    for (target, fmt) in [("o.raw", "raw"), ("o.qcow2", "qcow2")] {
        let start = std::time::Instant::now();
        let (code, _) = qimg(p, &["convert", "-r", "2M", "-O", fmt, "src.qcow2", target]);
        let took = start.elapsed();
        assert_eq!(code, 0);
        // 4 MiB at 2 MiB/s: the second 2 MiB wait for the first.
        assert!(
            took >= std::time::Duration::from_millis(900),
            "{fmt}: {took:?}"
        );
        assert_eq!(qemu(p, &["compare", "src.qcow2", target]).0, 0);
    }
    // 4 MiB of data in one run: written in qemu-img's 2 MiB pieces, the second waits.
    qcow2_image(p, &[], "one.qcow2", "4M", &["write -P 5 0 4M"]);
    let start = std::time::Instant::now();
    let (code, _) = qimg(
        p,
        &["convert", "-r", "2M", "-O", "raw", "one.qcow2", "one.raw"],
    );
    assert_eq!(code, 0);
    let took = start.elapsed();
    assert!(took >= std::time::Duration::from_millis(900), "{took:?}");
    qcow2_image(
        p,
        &["-b", "src.qcow2", "-F", "qcow2"],
        "top.qcow2",
        "",
        &["write -P 9 4M 4M"],
    );
    let start = std::time::Instant::now();
    assert_eq!(qimg(p, &["commit", "-r", "2M", "top.qcow2"]).0, 0);
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900),
        "commit: {took:?}"
    );
    assert_eq!(qemu(p, &["compare", "src.qcow2", "top.qcow2"]).0, 0);
}

/// `convert --bitmaps` copies the source's persistent bitmaps (names, granularities,
/// enabled state, bits) into a qcow2 target of any cluster size, compressed or not, as
/// qemu-img does; what it refuses (a raw target, several sources, an inconsistent bitmap
/// without --skip-broken-bitmaps) it refuses in qemu-img's words.
#[test]
fn convert_copies_bitmaps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "src.qcow2", "16M", &[]);
    qemu(p, &["bitmap", "--add", "-g", "4k", "src.qcow2", "some"]);
    qemu_io(
        p,
        "src.qcow2",
        &["write 0 1k", "write 5M 300k", "write 16380k 4k"],
    );
    qemu(p, &["bitmap", "--disable", "src.qcow2", "some"]);
    qemu(p, &["bitmap", "--add", "-g", "512", "src.qcow2", "recent"]);
    qemu_io(p, "src.qcow2", &["write 8M 1k"]);
    qcow2_image(p, &[], "plain.qcow2", "1M", &[]);
    qcow2_image(p, &["-o", "compat=0.10"], "v2.qcow2", "1M", &[]);
    qemu(p, &["create", "-q", "-f", "raw", "raw.img", "1M"]);
    // A bitmap left in use, as by a crash: the autoclear bit kept, the in-use flag set.
    std::fs::copy(p.join("src.qcow2"), p.join("broken.qcow2")).unwrap();
    let info = qemu(p, &["info", "--output=json", "broken.qcow2"]).1;
    assert!(info.contains("\"recent\""), "{info}");
    set_bitmap_in_use(&p.join("broken.qcow2"), "recent");
    // Both in use: QEMU goes through the bitmaps last first.
    std::fs::copy(p.join("broken.qcow2"), p.join("twobroken.qcow2")).unwrap();
    set_bitmap_in_use(&p.join("twobroken.qcow2"), "some");
    let mut copied = Vec::new();
    for args in [
        &["convert", "--bitmaps", "-O", "qcow2", "src.qcow2", "X"][..],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "src.qcow2",
            "X",
        ],
        &[
            "convert",
            "--bitmaps",
            "-c",
            "-O",
            "qcow2",
            "src.qcow2",
            "X",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "broken.qcow2",
            "X",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "broken.qcow2", "X"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "twobroken.qcow2",
            "X",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "twobroken.qcow2",
            "X",
        ],
        &["convert", "--bitmaps", "-O", "raw", "src.qcow2", "X"],
        // Sources that cannot have bitmaps: refused before the target is made.
        &["convert", "--bitmaps", "-O", "qcow2", "raw.img", "X"],
        &["convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "X"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "plain.qcow2",
            "X",
        ],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "X",
        ],
    ] {
        let mut results = Vec::new();
        for (tool, prog) in [
            (env!("CARGO_BIN_EXE_qimg"), "qimg"),
            ("qemu-img", "qemu-img"),
        ] {
            let target = format!("{prog}.out");
            let _ = std::fs::remove_file(p.join(&target));
            let outcome = run_with_stderr(p, tool, prog, &with_name(args, &target));
            let made = p.join(&target).exists() && args.contains(&"qcow2") && outcome.0 == 0;
            let info = match made {
                true => info_sans_sizes(p, &target, &target),
                false => String::new(),
            };
            let maps: Vec<String> = ["some", "recent"]
                .iter()
                .filter(|b| info.contains(&format!("name: {b}\n")))
                .map(|b| dirty_map(p, &target, b))
                .collect();
            results.push((
                outcome.0,
                outcome.1,
                outcome.2.replace(&target, "X"),
                maps,
                info,
            ));
        }
        assert_eq!(results[0], results[1], "{args:?}");
        if !results[0].3.is_empty() {
            copied.push(args.to_vec());
        }
    }
    assert_eq!(
        copied.len(),
        4,
        "conversions that copied bitmaps: {copied:?}"
    );
}

/// The file offset of the directory entry of bitmap `name` in the qcow2 image at `path`.
fn bitmap_entry_offset(path: &Path, name: &str) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    // The header extensions follow the v3 header; the bitmaps one names the directory.
    let mut ext = be32(100) as usize;
    while be32(ext) != 0x2385_2875 {
        assert_ne!(be32(ext), 0, "no bitmaps extension");
        ext += 8 + (be32(ext + 4) as usize).next_multiple_of(8);
    }
    let dir = be64(ext + 24) as usize..(be64(ext + 24) + be64(ext + 16)) as usize;
    // An entry's name follows its 24 fixed bytes (no extra data).
    let name_at = bytes[dir.clone()]
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("the bitmap's directory entry");
    (dir.start + name_at - 24) as u64
}

/// Sets the in-use flag of bitmap `name` in the qcow2 image at `path`, as a crash of the
/// program that had it open leaves it.
fn set_bitmap_in_use(path: &Path, name: &str) {
    let at = bitmap_entry_offset(path, name);
    let bytes = std::fs::read(path).unwrap();
    let flags_at = (at + 12) as usize;
    let flags = u32::from_be_bytes(bytes[flags_at..flags_at + 4].try_into().unwrap()) | 1;
    let f = std::fs::File::options().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &flags.to_be_bytes(), at + 12).unwrap();
}

/// Bitmaps QEMU could not store or load are refused as qemu-img refuses them, leaving the
/// image as it was: too fine for the disk (also at a new size), on an empty disk, in a v2
/// image (bitmap and convert). Names need not be UTF-8.
#[test]
fn bitmaps_qemu_could_not_load_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let refused = |args: &[&str], img: &str, why: &str| {
        let before = std::fs::read(p.join(img)).unwrap();
        let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(
            std::fs::read(p.join(img)).unwrap() == before,
            "{args:?} changed {img}"
        );
        assert_eq!(qemu(p, &["check", img]).0, 0, "{args:?}");
    };
    qcow2_image(p, &[], "huge.qcow2", "4T", &[]);
    let too_much = "Too much space will be occupied by the bitmap. Use larger granularity";
    assert_ne!(
        qemu(p, &["bitmap", "--add", "-g", "512", "huge.qcow2", "b"]).0,
        0
    );
    refused(
        &["bitmap", "--add", "-g", "512", "huge.qcow2", "b"],
        "huge.qcow2",
        too_much,
    );
    qcow2_image(p, &[], "fine.qcow2", "1G", &[]);
    qemu(p, &["bitmap", "--add", "-g", "512", "fine.qcow2", "b"]);
    refused(&["resize", "fine.qcow2", "4T"], "fine.qcow2", too_much);
    qcow2_image(p, &[], "empty.qcow2", "0", &[]);
    refused(
        &["bitmap", "--add", "empty.qcow2", "b"],
        "empty.qcow2",
        "the disk is empty",
    );
    qcow2_image(p, &["-o", "compat=0.10"], "v2.qcow2", "1M", &[]);
    let v2 = "Cannot store dirty bitmaps in qcow2 v2 files";
    refused(&["bitmap", "--add", "v2.qcow2", "b"], "v2.qcow2", v2);
    same(
        p,
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "fine.qcow2",
            "o",
        ],
    );
    // A name that is not UTF-8 survives a change of another bitmap.
    let odd = std::ffi::OsStr::from_bytes(b"\xff\xfe-odd");
    qcow2_image(p, &[], "names.qcow2", "1M", &[]);
    let add = |name: &std::ffi::OsStr| {
        let args = [
            OsStr::new("bitmap"),
            OsStr::new("--add"),
            OsStr::new("names.qcow2"),
            name,
        ];
        assert_eq!(run(p, "qemu-img", &args).0, 0);
    };
    add(odd);
    add(OsStr::new("plain"));
    let before = qemu(p, &["info", "names.qcow2"]).1;
    assert_eq!(
        qimg(p, &["bitmap", "--disable", "names.qcow2", "plain"]).0,
        0
    );
    let after = qemu(p, &["info", "names.qcow2"]).1;
    let names = after
        .lines()
        .filter(|l| l.trim_start().starts_with("name:"));
    assert_eq!(names.count(), 2, "{after}");
    assert_eq!(
        after.replace(
            "flags:\n            name: plain",
            "flags:\n                [0]: auto\n            name: plain"
        ),
        before
    );
}

/// `convert -n` keeps the target's bitmaps, its enabled ones marked dirty over the disk it
/// rewrites (before the first write: however the copy ends, they cover it); `--bitmaps`
/// then adds the source's, refusing a name the target has, as qemu-img does.
#[test]
fn convert_n_keeps_the_targets_bitmaps() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "src.qcow2", "4M", &["write -P 3 0 1M"]);
    qemu(p, &["bitmap", "--add", "src.qcow2", "new"]);
    qemu(p, &["bitmap", "--add", "src.qcow2", "enabled"]);
    qemu(p, &["bitmap", "--add", "src.qcow2", "mm"]);
    qcow2_image(p, &[], "t.qcow2", "4M", &[]);
    qemu(p, &["bitmap", "--add", "t.qcow2", "enabled"]);
    qemu(p, &["bitmap", "--add", "--disable", "t.qcow2", "disabled"]);
    std::fs::copy(p.join("t.qcow2"), p.join("t2.qcow2")).unwrap();
    std::fs::copy(p.join("t.qcow2"), p.join("t0.qcow2")).unwrap();
    let clash = [
        "convert",
        "-n",
        "--bitmaps",
        "-O",
        "qcow2",
        "src.qcow2",
        "X",
    ];
    let (ours, theirs) = (with_name(&clash, "t.qcow2"), with_name(&clash, "t2.qcow2"));
    let o = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &ours);
    let t = run_with_stderr(p, "qemu-img", "qemu-img", &theirs);
    assert_eq!(o, t);
    // Both stopped at the clash, the bitmaps before it (last first) copied.
    let names = |img: &str| {
        let info = qemu(p, &["info", img]).1;
        let names = info.lines().filter(|l| l.trim_start().starts_with("name:"));
        names.map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(names("t.qcow2"), names("t2.qcow2"));
    assert!(names("t.qcow2").iter().any(|n| n.ends_with(" mm")));
    // Start again without it.
    qemu(p, &["bitmap", "--remove", "src.qcow2", "enabled"]);
    std::fs::copy(p.join("t0.qcow2"), p.join("t.qcow2")).unwrap();
    assert_eq!(qimg(p, &ours).0, 0);
    let info = qemu(p, &["info", "t.qcow2"]).1;
    for name in ["enabled", "disabled", "new", "mm"] {
        assert!(info.contains(&format!("name: {name}\n")), "{name}: {info}");
    }
    assert_eq!(qemu(p, &["check", "t.qcow2"]).0, 0);
    assert_eq!(qemu(p, &["compare", "src.qcow2", "t.qcow2"]).0, 0);
    let all_dirty = "[{ \"start\": 0, \"length\": 4194304, \"depth\": 0, \"present\": false";
    assert!(dirty_map(p, "t.qcow2", "enabled").starts_with(all_dirty));
    assert!(!dirty_map(p, "t.qcow2", "disabled").starts_with(all_dirty));
}

/// A writer that does not keep bitmaps (the library's default: vhost-blk serving a guest)
/// drops their header extension (as QEMU's drivers without bitmap support do) and leaks their
/// clusters; a repair reclaims them, and bitmaps added later never free them a second time.
#[test]
fn invalidated_bitmaps_leak_and_are_never_freed_twice() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &[]);
    qemu(p, &["bitmap", "--add", "base.qcow2", "b0"]);
    {
        let opts = qcow2::OpenOptions::default();
        let img = qcow2::open_image(&p.join("base.qcow2"), &opts).unwrap();
        img.write_at(&[5; 1 << 20], 0).unwrap();
    }
    assert!(!qemu(p, &["info", "base.qcow2"]).1.contains("bitmaps"));
    assert_eq!(qimg(p, &["check", "-r", "leaks", "base.qcow2"]).0, 0);
    qemu_io(p, "base.qcow2", &["write -P 6 1M 1M"]);
    assert_eq!(qimg(p, &["bitmap", "--add", "base.qcow2", "nb"]).0, 0);
    let (code, out) = qemu(p, &["check", "base.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// Bitmap directories and tables that make no sense are refused when the image is opened,
/// whatever the command, as qemu-img refuses them (same exit code and message, naming the
/// bitmap), never a panic or a huge allocation, and the image is left as it was. (A check
/// that went on would count what a broken table names as leaked, and `-r leaks` free it.)
#[test]
fn damaged_bitmaps_are_refused_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "good.qcow2", "16M", &[]);
    qemu(p, &["bitmap", "--add", "good.qcow2", "damaged"]);
    qemu_io(p, "good.qcow2", &["write 0 64k"]);
    let entry = bitmap_entry_offset(&p.join("good.qcow2"), "damaged");
    let bytes = std::fs::read(p.join("good.qcow2")).unwrap();
    let table = u64::from_be_bytes(
        bytes[entry as usize..entry as usize + 8]
            .try_into()
            .unwrap(),
    );
    // (offset in the file, bytes written there)
    let damages: [(&str, u64, Vec<u8>); 6] = [
        ("huge_table", entry + 8, u32::MAX.to_be_bytes().to_vec()),
        ("granularity", entry + 17, vec![63]),
        (
            "unaligned_table",
            entry,
            (table + 0x200).to_be_bytes().to_vec(),
        ),
        ("flags", entry + 12, 4u32.to_be_bytes().to_vec()),
        (
            "table_entry",
            table,
            (0x1_0000_0100u64).to_be_bytes().to_vec(),
        ),
        (
            "unaligned_data",
            table,
            (0x1_0000_0200u64).to_be_bytes().to_vec(),
        ),
    ];
    for (name, at, data) in damages {
        let img = format!("{name}.qcow2");
        std::fs::copy(p.join("good.qcow2"), p.join(&img)).unwrap();
        patch(p, &img, at, &data);
        let before = std::fs::read(p.join(&img)).unwrap();
        for args in [
            &["info", "X"][..],
            &["check", "-r", "leaks", "X"],
            &["bitmap", "--clear", "X", "damaged"],
            &["bitmap", "--merge", "damaged", "X", "damaged"],
            &["resize", "X", "+1M"],
            &["convert", "--bitmaps", "-O", "qcow2", "X", "out.qcow2"],
        ] {
            let outcomes = run_on_copies(p, &img, args, |copy| {
                let _ = std::fs::remove_file(p.join("out.qcow2"));
                std::fs::read(p.join(copy)).unwrap() == before
            });
            let (code, _, err, kept) = &outcomes[0];
            assert_eq!(*code, 1, "{name} {args:?}: {err}");
            assert!(err.contains("damaged"), "{name} {args:?}: {err}");
            assert!(kept, "{name} changed by {args:?}");
            assert_eq!(
                (code, err),
                (&outcomes[1].0, &outcomes[1].2),
                "{name} {args:?}: qimg vs qemu-img"
            );
        }
    }
}

/// Persistent dirty bitmaps are resized with the disk as qemu-img resizes them: dropped
/// bits past a smaller end, clear bits in a grown range (also after shrinking through a set
/// range and growing back), tables that grow past a cluster; QEMU reads the same dirty map
/// from both images, which check clean.
#[test]
fn resize_resizes_persistent_bitmaps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // 512-byte clusters: a bitmap data cluster covers 2 MiB at 512-byte granularity, and a
    // table cluster 128 MiB.
    let writes = ["write 0 1k", "write 2M 64k", "write 4000k 96k"];
    qcow2_image(p, &["-o", "cluster_size=512"], "bm.qcow2", "4M", &[]);
    qemu(p, &["bitmap", "--add", "-g", "512", "bm.qcow2", "fine"]);
    qemu(p, &["bitmap", "--add", "-g", "8k", "bm.qcow2", "coarse"]);
    qemu_io(p, "bm.qcow2", &writes);
    for img in ["ours.qcow2", "theirs.qcow2"] {
        std::fs::copy(p.join("bm.qcow2"), p.join(img)).unwrap();
    }
    for size in [
        &["--shrink", "X", "2129408"][..],
        &["X", "4M"],
        &["X", "300M"],
        &["--shrink", "X", "4000k"],
        &["X", "+2M"],
    ] {
        let args = [&["resize"], size].concat();
        let (ours, theirs) = (
            with_name(&args, "ours.qcow2"),
            with_name(&args, "theirs.qcow2"),
        );
        assert_eq!(qimg(p, &ours), qemu(p, &theirs), "{args:?}");
        for bitmap in ["fine", "coarse"] {
            assert_eq!(
                dirty_map(p, "ours.qcow2", bitmap),
                dirty_map(p, "theirs.qcow2", bitmap),
                "{args:?} {bitmap}"
            );
        }
        assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0, "{args:?}");
        assert_eq!(
            info_sans_sizes(p, "ours.qcow2", "ours.qcow2"),
            info_sans_sizes(p, "theirs.qcow2", "theirs.qcow2")
        );
    }
    // The dirty ranges are there to compare: the first write, and nothing past the end.
    let map = dirty_map(p, "ours.qcow2", "fine");
    assert!(
        map.starts_with("[{ \"start\": 0, \"length\": 1024, \"depth\": 0, \"present\": false"),
        "{map}"
    );
}

/// Taking or deleting an internal snapshot and amending format options (the size too) leave
/// the guest's data alone: persistent dirty bitmaps stay valid, as with qemu-img (and
/// qemu-img check finds the same); applying a snapshot is refused with qemu-img's words.
#[test]
fn bitmaps_survive_snapshots_and_amend_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "bm.qcow2", "64M", &["write 0 64k"]);
    qemu(p, &["bitmap", "--add", "bm.qcow2", "b0"]);
    qemu_io(p, "bm.qcow2", &["write 1M 128k"]);
    qemu(p, &["bitmap", "--add", "-g", "128k", "bm.qcow2", "b1"]);
    qemu(p, &["bitmap", "--disable", "bm.qcow2", "b1"]);
    qemu(p, &["snapshot", "-c", "s0", "bm.qcow2"]);
    for args in [
        &["snapshot", "-c", "s1", "X"][..],
        &["snapshot", "-d", "s0", "X"],
        &["snapshot", "-a", "s0", "X"],
        &["amend", "-o", "lazy_refcounts=on", "X"],
        &["amend", "-o", "refcount_bits=8", "X"],
        &["amend", "-o", "size=256M", "X"],
    ] {
        let outcomes = run_on_copies(p, "bm.qcow2", args, |copy| {
            // Snapshot rows without their times (the tools ran in different seconds).
            let info: Vec<String> = info_sans_sizes(p, copy, copy)
                .lines()
                .map(|l| match l.starts_with(|c: char| c.is_ascii_digit()) {
                    true => l.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
                    false => l.to_string(),
                })
                .collect();
            let check = qemu(p, &["check", "--output=json", copy])
                .1
                .replace(copy, "X");
            let check: String = check.lines().filter(|l| !l.contains("offset")).collect();
            (info.join("\n"), check)
        });
        assert_eq!(outcomes[0], outcomes[1], "{args:?}");
        assert!(outcomes[0].3 .0.contains("name: b1"), "{args:?}");
    }
}

/// Growing an image whose backing file is longer than it: the new range reads as zeros, not
/// as the backing file's data (QEMU zeroes it), also when the growth comes from `commit`
/// into a shorter backing file, and when preallocating (the old end's partial cluster keeps
/// what the backing file shows there).
#[test]
fn growing_over_a_longer_backing_file_reads_zeros() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "1M", &["write -P 0x11 0 1M"]);
    qemu(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
            "500k",
        ],
    );
    qemu_io(p, "over.qcow2", &["write -P 0x22 0 64k"]);
    for (opts, identical) in [(&[][..], true), (&["--preallocation=metadata"][..], false)] {
        let mut a = vec!["resize"];
        a.extend(opts);
        a.extend(["X", "3M"]);
        let (ours, theirs) = same_on_copies(p, "over.qcow2", &a);
        assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0, "{a:?}");
        qemu_io(
            p,
            &ours,
            &[
                "read -P 0x22 0 64k",
                "read -P 0x11 64k 436k",
                "read -P 0 500k 2572k",
            ],
        );
        assert_eq!(qemu(p, &["check", &ours]).0, 0, "{a:?}");
        if identical {
            assert_eq!(
                qemu(p, &["map", "--output=json", &ours]),
                qemu(p, &["map", "--output=json", &theirs]),
                "{a:?}"
            );
        }
    }
    // A backing file that ends inside the old end's cluster: preallocating that cluster
    // would wipe what the backing file shows before the old end.
    qcow2_image(p, &[], "short.qcow2", "480k", &["write -P 0x11 0 480k"]);
    qemu(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "short.qcow2",
            "-F",
            "qcow2",
            "over2.qcow2",
            "500k",
        ],
    );
    let a = ["resize", "--preallocation=metadata", "X", "3M"];
    let (ours, theirs) = same_on_copies(p, "over2.qcow2", &a);
    assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0);
    qemu_io(p, &ours, &["read -P 0x11 0 480k", "read -P 0 480k 2592k"]);
    // commit -d into the shorter image in the middle of base <- over <- top.
    qemu(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "over.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "3M",
        ],
    );
    qemu_io(p, "top.qcow2", &["write -P 0x44 2M 100k"]);
    assert_eq!(qimg(p, &["commit", "-d", "top.qcow2"]).0, 0);
    // The shorter image itself now holds top's data, zeros where it grew.
    let info = qemu(p, &["info", "--output=json", "over.qcow2"]).1;
    assert!(info.contains("\"virtual-size\": 3145728"), "{info}");
    qemu_io(
        p,
        "over.qcow2",
        &[
            "read -P 0x22 0 64k",
            "read -P 0x11 64k 436k",
            "read -P 0 500k 1548k",
            "read -P 0x44 2M 100k",
        ],
    );
    assert_eq!(qemu(p, &["check", "over.qcow2"]).0, 0);
}

/// Grows copies of `img` (old size 999k, over a longer backing file of 0xaa) to 3M with
/// `prealloc` by both tools. Ours keeps the backing data before the old end, reads zeros
/// after it and is check-clean (no leaked cluster); it reads as qemu-img's copy when
/// qemu-img grows it too.
fn grow_preallocated_over_backing(dir: &Path, img: &str, prealloc: &str) {
    let pre = format!("--preallocation={prealloc}");
    let [ours, theirs] = ["ours", "theirs"].map(|w| format!("{w}-{prealloc}-{img}"));
    std::fs::copy(dir.join(img), dir.join(&ours)).unwrap();
    std::fs::copy(dir.join(img), dir.join(&theirs)).unwrap();
    assert_eq!(
        qimg(dir, &["resize", &pre, &ours, "3M"]).0,
        0,
        "{pre} {img}"
    );
    qemu_io(dir, &ours, &["read -P 0xaa 0 999k", "read -P 0 999k 2073k"]);
    assert_check_clean(dir, &ours);
    if qemu(dir, &["resize", &pre, &theirs, "3M"]).0 == 0 {
        assert_eq!(qemu(dir, &["compare", &ours, &theirs]).0, 0, "{pre} {img}");
    }
}

/// An extended-L2 image grown with preallocation over a longer backing file reads zeros
/// where it grew: the preallocated clusters get zero bits, not an all-unallocated bitmap.
#[test]
fn growing_an_extended_l2_image_with_preallocation_hides_the_backing_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &["write -P 0xaa 0 4M"]);
    let opts = ["-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2"];
    qcow2_image(p, &opts, "x.qcow2", "999k", &[]);
    for prealloc in ["metadata", "falloc", "full"] {
        grow_preallocated_over_backing(p, "x.qcow2", prealloc);
    }
}

/// A v2 image (no zero flag) grown over a longer backing file: without preallocation or
/// with metadata, both tools refuse ("Failed to zero out new clusters"), and `commit` into
/// such an image fails its block job; with falloc and full, the preallocated clusters read
/// as zeros and none leaks.
#[test]
fn growing_a_v2_image_over_a_longer_backing_file_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &["write -P 0xaa 0 4M"]);
    let opts = ["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"];
    qcow2_image(p, &opts, "v2.qcow2", "999k", &[]);
    for prealloc in ["off", "metadata"] {
        let pre = format!("--preallocation={prealloc}");
        let (ours, _) = same_on_copies(p, "v2.qcow2", &["resize", &pre, "X", "3M"]);
        let args = ["resize", pre.as_str(), ours.as_str(), "3M"];
        let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
        let error = "PROG: Failed to zero out new clusters: Operation not supported\n";
        assert_eq!((code, err.as_str()), (1, error));
    }
    for prealloc in ["falloc", "full"] {
        grow_preallocated_over_backing(p, "v2.qcow2", prealloc);
    }
    qcow2_over(p, "v2.qcow2", "top.qcow2", "3M", &["write -P 0x33 2M 4k"]);
    std::fs::copy(p.join("v2.qcow2"), p.join("v2.orig")).unwrap();
    let error = "PROG: Block job failed: Operation not supported\n";
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let out = run_with_stderr(p, tool, prog, &["commit", "top.qcow2"]);
        assert_eq!((out.0, out.2.as_str()), (1, error), "{prog}");
        let (code, _) = qemu(p, &["compare", "v2.qcow2", "v2.orig"]);
        assert_eq!(code, 0, "{prog} changed the image it could not grow");
    }
}

/// Runs `args` (with `X` for the image) on copies of `img` by both tools: same exit code and
/// stdout, and both copies still byte for byte equal to `img` when `untouched`.
fn same_on_copies_untouched(dir: &Path, img: &str, args: &[&str], untouched: bool) {
    let before = std::fs::read(dir.join(img)).unwrap();
    let (ours, theirs) = same_on_copies(dir, img, args);
    if untouched {
        assert!(
            std::fs::read(dir.join(theirs)).unwrap() == before,
            "{args:?}"
        );
        assert!(std::fs::read(dir.join(ours)).unwrap() == before, "{args:?}");
    }
}

#[test]
fn resize_refuses_what_qemu_img_refuses_and_leaves_the_image_alone() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "q.qcow2", "1M", &["write -P 1 0 64k"]);
    for (args, untouched) in [
        (&["resize", "X", "20001"][..], true),
        (&["resize", "X", "+1"], true),
        (&["resize", "--shrink", "X", "20001"], true),
        (&["resize", "--preallocation=full", "X", "2000001"], true),
        (&["resize", "--preallocation=falloc", "X", "512k"], true),
        (&["resize", "X", "9223372036854775807"], true),
        (&["resize", "X", "9223372035781034496"], true),
        (&["resize", "X", "2M"], false),
    ] {
        same_on_copies_untouched(p, "q.qcow2", args, untouched);
    }
    std::fs::write(p.join("r.raw"), vec![3u8; 1 << 20]).unwrap();
    for (args, untouched) in [
        (
            &["resize", "--preallocation=metadata", "-f", "raw", "X", "2M"][..],
            true,
        ),
        (
            &["resize", "--preallocation=falloc", "-f", "raw", "X", "2M"],
            false,
        ),
        (&["resize", "-f", "raw", "X", "2000001"], false),
        (&["resize", "-f", "raw", "X", "9223372036854775807"], true),
    ] {
        same_on_copies_untouched(p, "r.raw", args, untouched);
    }
    // Probed raw: the size's syntax is refused before the probe's warning, as qemu-img
    // refuses it (stderr in the same order).
    for size in ["abc", "+1x"] {
        let outcomes = run_on_copies(p, "r.raw", &["resize", "X", size], |_| ());
        assert_eq!(outcomes[0].0, 1, "{size}");
        assert_eq!(outcomes[0], outcomes[1], "{size}");
    }
    assert!(qimg_stderr(p, &["resize", "q.qcow2", "+1"])
        .contains("The new size must be a multiple of 512"));
    // An external data file the file system cannot grow that far (ext4 stops at 16 TiB): the
    // error in QEMU's words, at once (qimg's undo walked every cluster of the petabyte first),
    // and the image as qemu-img leaves it.
    qcow2_image(p, &["-o", "data_file=d.data"], "d.qcow2", "64M", &[]);
    let outcomes = run_on_copies(p, "d.qcow2", &["resize", "X", "1P"], |copy| {
        std::fs::File::options()
            .write(true)
            .open(p.join("d.data"))
            .and_then(|f| f.set_len(64 << 20))
            .unwrap();
        qemu(p, &["check", copy]).1.replace(copy, "X")
    });
    assert_eq!(outcomes[0], outcomes[1]);
}

/// What qimg cannot do (formats other than raw and qcow2, options it lacks, images named by
/// option strings it cannot honour) fails with exit code 1 where qemu-img would act. Bad
/// command lines: `command_line_errors_match_qemu_img`.
#[test]
fn unsupported_formats_and_options_fail_with_exit_1() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    for args in [
        &["map", "--output=xml", "a.qcow2"][..],
        &["measure", "-O", "vmdk", "--size", "1G"],
        &["resize", "-f", "vmdk", "a.qcow2", "1G"],
        &["rebase", "-f", "vmdk", "-b", "", "a.qcow2"],
        &["commit", "--bogus", "a.qcow2"],
        &["dd", "if=a.qcow2", "of=b.raw", "conv=notrunc"],
        &["bench", "--bogus", "a.qcow2"],
        &["snapshot", "-l", "-c", "x", "a.qcow2"],
        &["amend", "-o", "bogus=1", "a.qcow2"],
        &[
            "convert",
            "--object",
            "secret,id=s,data=x",
            "a.qcow2",
            "b.raw",
        ],
        &["check", "--object", "secret,id=s,data=x", "a.qcow2"],
        &["info", "--image-opts", "driver=file,filename=a.qcow2"],
        &[
            "info",
            "--image-opts",
            "file.filename=a.qcow2,cache.direct=on",
        ],
        &[
            "map",
            "--image-opts",
            "file.driver=nbd,file.filename=a.qcow2",
        ],
        &[
            "info",
            r#"json:{"file":{"filename":"a.qcow2"},"backing":null}"#,
        ],
    ] {
        let (code, _) = qimg(p, args);
        assert_eq!(code, 1, "{args:?}");
    }
}

/// base (4M) <- mid (4M) <- top (6M), each with data, in `dir` with names prefixed `p`.
fn make_chain(dir: &Path, p: &str) {
    make_chain_with(dir, p, &[]);
}

/// [`make_chain`] with extra create options (`opts`) for every image.
fn make_chain_with(dir: &Path, p: &str, opts: &[&str]) {
    let (base, mid, top) = (
        format!("{p}base.qcow2"),
        format!("{p}mid.qcow2"),
        format!("{p}top.qcow2"),
    );
    qcow2_image(
        dir,
        opts,
        &base,
        "4M",
        &["write -P 1 0 1M", "write -P 2 2M 512k"],
    );
    qcow2_image(
        dir,
        &[opts, &["-b", &base, "-F", "qcow2"]].concat(),
        &mid,
        "",
        &["write -P 3 512k 1M", "write -z 3M 64k"],
    );
    qcow2_image(
        dir,
        &[opts, &["-b", &mid, "-F", "qcow2"]].concat(),
        &top,
        "6M",
        &["write -P 4 1M 100k", "write -P 5 5M 64k", "write -z 0 64k"],
    );
}

/// The guest contents of every image of both chains agree, and ours pass `qemu-img check`.
fn chains_agree(dir: &Path, layout_too: bool) {
    for f in ["base", "mid", "top"] {
        let (a, b) = (format!("A-{f}.qcow2"), format!("B-{f}.qcow2"));
        assert_eq!(qemu(dir, &["compare", &a, &b]).0, 0, "{f}");
        assert_eq!(qemu(dir, &["check", &b]).0, 0, "{f}");
        assert_eq!(
            info_sans_sizes(dir, &a, "A-"),
            info_sans_sizes(dir, &b, "B-"),
            "{f}"
        );
        if layout_too {
            assert_eq!(
                qemu(dir, &["map", "--output=json", &a]),
                qemu(dir, &["map", "--output=json", &b]),
                "{f}"
            );
        }
    }
}

/// Runs `args` (with `X` standing for the chain prefix) on chain A with qemu-img and on
/// chain B with qimg; both must print the same and exit the same.
fn same_on_chains(dir: &Path, args: &[&str]) {
    same_on_chains_with(dir, args, &[]);
}

/// [`same_on_chains`] on chains made with extra create options `opts`.
fn same_on_chains_with(dir: &Path, args: &[&str], opts: &[&str]) {
    for p in ["A-", "B-"] {
        for f in ["base", "mid", "top"] {
            let _ = std::fs::remove_file(dir.join(format!("{p}{f}.qcow2")));
        }
        make_chain_with(dir, p, opts);
    }
    let with = |p: &str| -> Vec<String> { args.iter().map(|a| a.replace("X-", p)).collect() };
    let t = qemu(dir, &with("A-"));
    let o = qimg(dir, &with("B-"));
    assert_eq!(o, t, "qimg vs qemu-img differ for {args:?}");
}

#[test]
fn rebase_matches_in_safe_and_unsafe_mode() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &[],
        "other.qcow2",
        "4M",
        &["write -P 1 0 512k", "write -P 6 3M 64k"],
    );
    qcow2_image(
        p,
        &["-o", "cluster_size=4k"],
        "small.qcow2",
        "6M",
        &["write -P 7 100k 3M"],
    );
    for args in [
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "X-top.qcow2"][..],
        &["rebase", "-b", "X-base.qcow2", "-F", "qcow2", "X-top.qcow2"],
        &["rebase", "-b", "small.qcow2", "-F", "qcow2", "X-mid.qcow2"],
        &["rebase", "-b", "", "X-top.qcow2"],
        &["rebase", "-c", "-b", "", "X-mid.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "X-top.qcow2",
        ],
        &["rebase", "-u", "-b", "", "X-top.qcow2"],
        &["rebase", "-u", "X-top.qcow2"],
    ] {
        same_on_chains(p, args);
        chains_agree(p, true);
    }
    same_on_chains(p, &["rebase", "X-top.qcow2"]);
    same_on_chains(
        p,
        &[
            "rebase",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "X-top.qcow2",
        ],
    );
    same_on_chains(
        p,
        &[
            "rebase",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "missing.qcow2",
        ],
    );
}

#[test]
fn commit_matches_and_empties_the_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for (args, layout_too) in [
        (&["commit", "X-top.qcow2"][..], true),
        (&["commit", "-d", "X-top.qcow2"], true),
        (&["commit", "-q", "X-mid.qcow2"], true),
        (&["commit", "-b", "X-mid.qcow2", "X-top.qcow2"], true),
        // QEMU's commit job writes these runs in another order; the contents agree.
        (&["commit", "-b", "X-base.qcow2", "X-top.qcow2"], false),
    ] {
        same_on_chains(p, args);
        chains_agree(p, layout_too);
    }
    let size = |f: &str| std::fs::metadata(p.join(f)).unwrap().len();
    same_on_chains(p, &["commit", "X-top.qcow2"]);
    assert_eq!(
        size("A-top.qcow2"),
        size("B-top.qcow2"),
        "emptied to the same length"
    );
    same_on_chains(p, &["commit", "-b", "missing.qcow2", "X-top.qcow2"]);
    same_on_chains(p, &["commit", "X-base.qcow2"]);
}

#[test]
fn commit_and_rebase_chains_with_extended_l2_entries() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let xl2 = ["-o", "extended_l2=on"];
    qcow2_image(p, &[], "other.qcow2", "4M", &["write -P 1 0 512k"]);
    for args in [
        &["commit", "X-top.qcow2"][..],
        &["commit", "-b", "X-base.qcow2", "X-top.qcow2"],
        &["rebase", "-b", "X-base.qcow2", "-F", "qcow2", "X-top.qcow2"],
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "X-top.qcow2"],
        &["rebase", "-b", "", "X-mid.qcow2"],
    ] {
        same_on_chains_with(p, args, &xl2);
        // Contents (and qemu-img check) agree; QEMU's commit job lays clusters out in
        // another order.
        chains_agree(p, false);
    }
}

/// `rebase -c` on an extended-L2 image whose clusters are partly allocated: only clusters
/// unallocated as a whole are written compressed, the rest of a partly allocated one
/// uncompressed, and the image's own subclusters keep their data (qemu-img 10 asserts).
#[test]
fn rebase_compressed_keeps_allocated_subclusters() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "old.qcow2", "1M", &["write -P 0xaa 0 1M"]);
    qcow2_image(p, &[], "new.qcow2", "1M", &["write -P 0xbb 0 1M"]);
    qcow2_image(
        p,
        &["-o", "extended_l2=on", "-b", "old.qcow2", "-F", "qcow2"],
        "top.qcow2",
        "",
        &["write -P 0x11 0 2k", "write -P 0x22 200k 4k"],
    );
    assert_eq!(
        qemu(p, &["convert", "-O", "raw", "top.qcow2", "before.raw"]).0,
        0
    );
    let (code, _) = qimg(
        p,
        &[
            "rebase",
            "-c",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(qemu(p, &["compare", "before.raw", "top.qcow2"]).0, 0);
    qemu_io(
        p,
        "top.qcow2",
        &["read -P 0x11 0 2k", "read -P 0x22 200k 4k"],
    );
    let (code, check) = qemu(p, &["check", "top.qcow2"]);
    assert_eq!(code, 0, "{check}");
    // 14 of the 16 clusters were unallocated as a whole.
    assert!(check.contains("87.50% compressed clusters"), "{check}");
}

#[test]
fn commit_and_rebase_refuse_bad_options_and_leave_the_chain_alone() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_chain(p, "");
    qcow2_image(p, &[], "new.qcow2", "6M", &["write -P 7 0 1M"]);
    let files = ["base.qcow2", "mid.qcow2", "top.qcow2", "new.qcow2"];
    let read = || files.map(|f| std::fs::read(p.join(f)).unwrap());
    let before = read();
    for args in [
        &["commit", "-t", "bogus", "top.qcow2"][..],
        &["commit", "-r", "xyz", "top.qcow2"],
        &["commit", "-r", "-5", "top.qcow2"],
        &["commit", "-r", "10E", "top.qcow2"],
        &["commit", "-r", "xyz", "-t", "bogus", "top.qcow2"],
    ] {
        same(p, args);
        assert!(read() == before, "{args:?} changed the chain");
    }
    for args in [
        &[
            "rebase",
            "-t",
            "bogus",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ][..],
        &[
            "rebase",
            "-T",
            "bogus",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-u",
            "-t",
            "bogus",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-u",
            "-T",
            "bogus",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        same(p, args);
        assert!(read() == before, "{args:?} changed the chain");
    }
    for args in [
        &[
            "rebase",
            "-u",
            "-b",
            "new.qcow2",
            "-F",
            "vmdkx",
            "top.qcow2",
        ][..],
        &["rebase", "-b", "new.qcow2", "-F", "vmdkx", "top.qcow2"],
    ] {
        same(p, args);
        assert!(read() == before, "{args:?} changed the chain");
    }
    let err = qimg_stderr(
        p,
        &[
            "rebase",
            "-u",
            "-b",
            "new.qcow2",
            "-F",
            "vmdkx",
            "top.qcow2",
        ],
    );
    assert!(err.contains("Invalid format name: 'vmdkx'"), "{err}");
    // A format qemu-img knows is still written in unsafe mode, as qemu-img does.
    for tool in [env!("CARGO_BIN_EXE_qimg"), "qemu-img"] {
        let args = ["rebase", "-u", "-b", "new.qcow2", "-F", "vmdk", "top.qcow2"];
        assert_eq!(run(p, tool, &args).0, 0, "{tool}");
        let info = qemu(p, &["info", "top.qcow2"]).1;
        assert!(info.contains("backing file format: vmdk"), "{tool}: {info}");
        std::fs::write(p.join("top.qcow2"), &before[2]).unwrap();
    }
    let err = qimg_stderr(p, &["commit", "-t", "bogus", "top.qcow2"]);
    assert!(err.contains("Invalid cache option: bogus"), "{err}");
    let err = qimg_stderr(p, &["commit", "-r", "xyz", "top.qcow2"]);
    assert!(
        err.contains("Invalid rate limit specified: 'xyz'."),
        "{err}"
    );
}

#[test]
fn dd_matches() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_chain(p, "");
    std::fs::write(p.join("odd.raw"), [7u8; 1000]).unwrap();
    for args in [
        &["if=top.qcow2", "of=X1.raw", "bs=64k", "count=10", "skip=2"][..],
        &["-O", "qcow2", "if=top.qcow2", "of=X2.qcow2", "bs=1M"],
        &[
            "if=top.qcow2",
            "of=X3.raw",
            "bs=64k",
            "count=10",
            "skip=100",
        ],
        &["if=top.qcow2", "of=X4.raw"],
        &[
            "-f",
            "qcow2",
            "-O",
            "raw",
            "if=top.qcow2",
            "of=X5.raw",
            "bs=1000",
            "count=3",
            "skip=1",
        ],
        &["if=top.qcow2", "of=X6.raw", "count=0"],
        &["if=odd.raw", "of=X7.raw", "bs=100"],
        // Blocks that start after the last byte of a raw input, inside its last sector.
        &["if=odd.raw", "of=X11.raw", "bs=7"],
        &["if=odd.raw", "of=X12.raw", "bs=1", "skip=1000"],
        &["if=top.qcow2"],
        &["if=top.qcow2", "of=X8.raw", "bs=0"],
        &["if=top.qcow2", "of=X9.raw", "foo=1"],
        &["if=missing.qcow2", "of=X10.raw"],
    ] {
        let with = |x: &str| -> Vec<String> {
            std::iter::once("dd".to_string())
                .chain(args.iter().map(|a| a.replace('X', x)))
                .collect()
        };
        let t = qemu(p, &with("theirs"));
        let o = qimg(p, &with("ours"));
        assert_eq!(o, t, "{args:?}");
        let Some(out) = args.iter().find_map(|a| a.strip_prefix("of=X")) else {
            continue;
        };
        let (theirs, ours) = (format!("theirs{out}"), format!("ours{out}"));
        assert_eq!(p.join(&theirs).exists(), p.join(&ours).exists(), "{args:?}");
        if p.join(&theirs).exists() {
            assert_eq!(size_of(p, &theirs), size_of(p, &ours), "{args:?}");
            assert_eq!(qemu(p, &["compare", &theirs, &ours]).0, 0, "{args:?}");
            if out.ends_with(".qcow2") {
                // Laid out as qemu-img lays it out: each L2 table before its data.
                let bytes = |f: &str| std::fs::read(p.join(f)).unwrap();
                assert!(
                    bytes(&theirs) == bytes(&ours),
                    "{args:?}: the images differ"
                );
            }
        }
    }
}

fn size_of(dir: &Path, f: &str) -> u64 {
    std::fs::metadata(dir.join(f)).unwrap().len()
}

#[test]
fn bench_prints_the_same_header_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    make_chain(p, "");
    for args in [
        &["-c", "1000", "base.qcow2"][..],
        &[
            "-w",
            "-c",
            "100",
            "-d",
            "4",
            "-s",
            "8k",
            "-S",
            "16k",
            "-o",
            "1M",
            "--flush-interval=10",
            "--pattern=5",
            "X",
        ],
        // Deep queue: in-place writes through io_uring mixed with allocating ones in the
        // same clusters.
        &[
            "-w",
            "-c",
            "400",
            "-d",
            "32",
            "-S",
            "12k",
            "--pattern=7",
            "X",
        ],
        &["-c", "10", "-s", "1M", "-o", "3M", "base.qcow2"],
        &["-c", "10", "-o", "4M", "base.qcow2"],
        &["-c", "10", "-d", "0", "base.qcow2"],
        &["-c", "10", "--flush-interval=10", "base.qcow2"],
        &["-c", "10", "-i", "bogus", "base.qcow2"],
        &["-c", "10", "missing.qcow2"],
        &["-c", "10", "-t", "bogus", "X"],
        &["-c", "10", "-w", "-U", "X"],
        &["-c", "10", "-n", "X"],
        &["-c", "10", "-i", "native", "X"],
        &["-c", "10", "-i", "native", "-t", "none", "X"],
        &["-c", "10", "-w", "--flush-interval=1", "--no-drain", "X"],
        &["-c", "10", "-s", "64k", "-S", "0", "X"],
        &["-c", "10", "-w", "--pattern=foo", "X"],
        &["-c", "10", "-w", "--pattern=300", "X"],
        &["-c", "10", "-w", "--pattern=0x10", "X"],
        &["-c", "1", "-s", "8M", "X"],
        &[
            "--count=10",
            "--depth=2",
            "--buffer-size=8k",
            "--offset=64k",
            "--step-size=16k",
            "--aio=threads",
            "--cache=writeback",
            "--format=qcow2",
            "--write",
            "X",
        ],
    ] {
        std::fs::copy(p.join("base.qcow2"), p.join("theirs.qcow2")).unwrap();
        std::fs::copy(p.join("base.qcow2"), p.join("ours.qcow2")).unwrap();
        let args = [&["bench"], args].concat();
        let (tc, t) = qemu(p, &with_name(&args, "theirs.qcow2"));
        let (oc, o) = qimg(p, &with_name(&args, "ours.qcow2"));
        // The timing line differs; everything before it must not.
        let head = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("Run completed"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!((oc, head(&o)), (tc, head(&t)), "{args:?}");
        let errors = |tool: &str, prog: &str, img: &str| {
            run_with_stderr(p, tool, prog, &with_name(&args, img))
                .2
                .replace(img, "X")
        };
        assert_eq!(
            errors(env!("CARGO_BIN_EXE_qimg"), "qimg", "ours.qcow2"),
            errors("qemu-img", "qemu-img", "theirs.qcow2"),
            "{args:?}"
        );
        assert_eq!(
            o.contains("Run completed in "),
            t.contains("Run completed in "),
            "{args:?}"
        );
        assert_eq!(
            qemu(p, &["compare", "theirs.qcow2", "ours.qcow2"]).0,
            0,
            "{args:?}"
        );
        assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0, "{args:?}");
    }
}

/// `bench -w` keeps the image's persistent dirty bitmaps and marks what it writes in the
/// enabled ones, as qemu-img's writes mark them (it used to drop them all); on a raw image
/// whose format was probed it warns as qemu-img does.
#[test]
fn bench_writes_keep_and_mark_bitmaps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "bm.qcow2", "16M", &[]);
    qemu(p, &["bitmap", "--add", "bm.qcow2", "on"]);
    qemu(p, &["bitmap", "--add", "bm.qcow2", "off"]);
    qemu(p, &["bitmap", "--disable", "bm.qcow2", "off"]);
    let args = [
        "bench", "-w", "-c", "20", "-s", "4k", "-S", "1M", "-o", "3M",
    ];
    for img in ["ours.qcow2", "theirs.qcow2"] {
        std::fs::copy(p.join("bm.qcow2"), p.join(img)).unwrap();
    }
    assert_eq!(qimg(p, &[&args[..], &["ours.qcow2"]].concat()).0, 0);
    assert_eq!(qemu(p, &[&args[..], &["theirs.qcow2"]].concat()).0, 0);
    assert_eq!(
        info_sans_sizes(p, "ours.qcow2", "ours.qcow2"),
        info_sans_sizes(p, "theirs.qcow2", "theirs.qcow2")
    );
    for bitmap in ["on", "off"] {
        assert_eq!(
            dirty_map(p, "ours.qcow2", bitmap),
            dirty_map(p, "theirs.qcow2", bitmap),
            "{bitmap}"
        );
    }
    assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0);
    std::fs::write(p.join("r.img"), vec![0u8; 1 << 20]).unwrap();
    let args = ["bench", "-w", "-c", "1", "r.img"];
    assert_eq!(
        run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args).2,
        run_with_stderr(p, "qemu-img", "qemu-img", &args).2
    );
}

/// A raw image with data, a hole, an allocated run of zeros, data in the middle of a
/// cluster and a last partial cluster.
fn mixed_raw(dir: &Path, name: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dir.join(name)).unwrap();
    let size = (5 << 20) + 1000;
    f.set_len(size).unwrap();
    let text: Vec<u8> = (0..(1 << 20)).map(|i| b"qcow2 and raw "[i % 14]).collect();
    f.write_all_at(&text, 0).unwrap();
    f.write_all_at(&vec![0u8; 192 << 10], 2 << 20).unwrap();
    f.write_all_at(&text[..4096], (3 << 20) + 4096).unwrap();
    f.write_all_at(&text[..1000], size - 1000).unwrap();
}

#[test]
fn convert_lays_out_the_target_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    mixed_raw(p, "src.raw");
    // Whole 4 MiB convert chunks without data between chunks with data.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(p.join("sparse.raw")).unwrap();
        f.set_len(40 << 20).unwrap();
        for mib in [5, 13, 14, 29, 39] {
            f.write_all_at(&[mib as u8; 100 << 10], mib << 20).unwrap();
        }
        // Zero runs of all sizes and alignments inside data, for -S.
        let f = std::fs::File::create(p.join("zeros.raw")).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        for (at, len) in [
            (128 << 10, 5 << 10),
            (300 << 10, 2048),
            (409_600, 1536),
            (600 << 10, 64 << 10),
        ] {
            f.write_all_at(&vec![0u8; len], at).unwrap();
        }
        f.write_all_at(&[0u8; 1536], (1 << 20) - 1536).unwrap();
    }
    for (args, src) in [
        (vec!["-O", "qcow2"], "src.raw"),
        (vec!["-O", "qcow2", "-m", "1"], "src.raw"),
        (vec!["-O", "qcow2", "-o", "cluster_size=4096"], "src.raw"),
        (vec!["-O", "qcow2", "-S", "0"], "src.raw"),
        (vec!["-O", "qcow2", "-t", "writeback"], "src.raw"),
        (vec!["-O", "raw"], "src.raw"),
        (vec!["-O", "qcow2"], "sparse.raw"),
        // A large -S writes the data, not the source's holes around it.
        (vec!["-O", "raw", "-S", "1M"], "sparse.raw"),
        (vec!["-O", "raw", "-S", "16M"], "sparse.raw"),
        // Zero runs inside data: left out from -S bytes on, ends aligned as qemu-img's.
        (vec!["-O", "raw"], "zeros.raw"),
        (vec!["-O", "raw", "-S", "512"], "zeros.raw"),
        (vec!["-O", "raw", "-S", "1536"], "zeros.raw"),
        (vec!["-O", "raw", "-S", "3k"], "zeros.raw"),
        (vec!["-O", "raw", "-S", "8k"], "zeros.raw"),
        // A qcow2 target allocates every (sub)cluster that data written so touches.
        (vec!["-O", "qcow2", "-S", "1M"], "zeros.raw"),
        (vec!["-O", "qcow2", "-o", "cluster_size=1k"], "zeros.raw"),
        (
            vec!["-O", "qcow2", "-o", "cluster_size=2k", "-S", "8k"],
            "zeros.raw",
        ),
        (vec!["-O", "qcow2", "-o", "extended_l2=on"], "zeros.raw"),
        (vec!["-O", "qcow2", "-o", "extended_l2=on"], "sparse.raw"),
    ] {
        let mut a = vec!["convert"];
        a.extend(&args);
        a.push(src);
        assert_eq!(qimg(p, &[&a[..], &["ours"]].concat()).0, 0, "{a:?}");
        assert_eq!(qemu(p, &[&a[..], &["theirs"]].concat()).0, 0, "{a:?}");
        assert_eq!(qemu(p, &["compare", src, "ours"]).0, 0, "{a:?}");
        // Same allocation, same host offsets: the clusters are laid out in guest order.
        // (Clusters under 4 KiB: the refcount blocks go elsewhere, moving host offsets.)
        let small = args.iter().any(|a| a.contains("cluster_size=1k"));
        match small {
            true => assert_eq!(allocation(p, "ours"), allocation(p, "theirs"), "{a:?}"),
            false => assert_eq!(
                qemu(p, &["map", "--output=json", "ours"]),
                qemu(p, &["map", "--output=json", "theirs"]),
                "{a:?}"
            ),
        }
        if args[1] == "qcow2" {
            let (code, out) = qemu(p, &["check", "ours"]);
            assert_eq!(code, 0, "{a:?}: {out}");
            assert!(small || out.contains(" 0.00% fragmented"), "{a:?}: {out}");
        }
    }
}

#[test]
fn convert_with_a_backing_file_copies_only_the_top_layer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "8M", &["write -P 1 0 4M"]);
    qcow2_over(
        p,
        "base.qcow2",
        "top.qcow2",
        "",
        &["write -P 2 1M 128k", "write -z 2M 64k", "write -P 3 6M 64k"],
    );
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    assert_eq!(qimg(p, &[&args[..], &["ours.qcow2"]].concat()).0, 0);
    assert_eq!(qemu(p, &[&args[..], &["theirs.qcow2"]].concat()).0, 0);
    assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0);
    assert_eq!(qemu(p, &["compare", "top.qcow2", "ours.qcow2"]).0, 0);
    assert_eq!(
        qemu(p, &["map", "--output=json", "ours.qcow2"]),
        qemu(p, &["map", "--output=json", "theirs.qcow2"])
    );
    // Without -F, and -B for a raw target: qemu-img's errors and exit code.
    let (code, _) = qimg(
        p,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "x.qcow2",
        ],
    );
    assert_eq!(code, 1);
    let (code, _) = qimg(
        p,
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "x.raw",
        ],
    );
    assert_eq!(code, 1);
    // A target backing file that differs from the source's chain: where the source reads
    // zeros (no backing file of its own, or past its end), zeros go into the target, except
    // past the end of the target's backing file; -S 0 writes them as data. Several sources
    // with -B are refused. Same contents and layout as qemu-img's.
    qcow2_image(p, &[], "other.qcow2", "12M", &["write -P 4 0 12M"]);
    qcow2_image(p, &[], "alone.qcow2", "10M", &["write -P 5 100k 100k"]);
    qcow2_image(p, &[], "short.qcow2", "1M", &["write -P 6 0 1M"]);
    qcow2_over(
        p,
        "short.qcow2",
        "over.qcow2",
        "16M",
        &["write -P 7 3M 64k"],
    );
    for (src, extra) in [
        ("alone.qcow2", &[][..]),
        ("over.qcow2", &[][..]),
        ("alone.qcow2", &["-S", "0"][..]),
    ] {
        let mut args = vec!["convert", "-O", "qcow2", "-B", "other.qcow2", "-F", "qcow2"];
        args.extend(extra);
        args.push(src);
        for out in ["ours.qcow2", "theirs.qcow2"] {
            let _ = std::fs::remove_file(p.join(out));
        }
        assert_eq!(qimg(p, &[&args[..], &["ours.qcow2"]].concat()).0, 0);
        assert_eq!(qemu(p, &[&args[..], &["theirs.qcow2"]].concat()).0, 0);
        // (Where the source's own backing file shows, the target's shows instead.)
        assert_eq!(
            qemu(p, &["compare", "ours.qcow2", "theirs.qcow2"]).0,
            0,
            "{args:?}"
        );
        if src == "alone.qcow2" {
            assert_eq!(qemu(p, &["compare", src, "ours.qcow2"]).0, 0, "{args:?}");
        }
        assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0, "{args:?}");
        assert_eq!(
            qemu(p, &["map", "--output=json", "ours.qcow2"]),
            qemu(p, &["map", "--output=json", "theirs.qcow2"]),
            "{args:?}"
        );
    }
    // A source with smaller clusters than the target's: where it writes part of a target
    // cluster, the rest of that cluster keeps what the target shows (the new backing file's
    // data; with -n, the target's own), as QEMU's copy-on-write keeps it, not the source's
    // backing file's. Compressed clusters are written whole from the source, as qemu-img does.
    qcow2_image(
        p,
        &["-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2"],
        "small.qcow2",
        "8M",
        &["write -P 2 68k 4k", "write -P 3 1M 60k", "write -P 5 2M 4k"],
    );
    qcow2_over(
        p,
        "other.qcow2",
        "n_ours.qcow2",
        "8M",
        &["write -P 9 64k 64k"],
    );
    std::fs::copy(p.join("n_ours.qcow2"), p.join("n_theirs.qcow2")).unwrap();
    for (extra, ours, theirs) in [
        (&[][..], "s_ours.qcow2", "s_theirs.qcow2"),
        (&["-c"][..], "c_ours.qcow2", "c_theirs.qcow2"),
        (&["-n"][..], "n_ours.qcow2", "n_theirs.qcow2"),
    ] {
        let args = [
            &["convert", "-O", "qcow2", "-B", "other.qcow2", "-F", "qcow2"],
            extra,
        ]
        .concat();
        let args = [&args[..], &["small.qcow2"]].concat();
        assert_eq!(qimg(p, &[&args[..], &[ours]].concat()).0, 0, "{extra:?}");
        assert_eq!(qemu(p, &[&args[..], &[theirs]].concat()).0, 0, "{extra:?}");
        let (code, out) = qemu(p, &["compare", ours, theirs]);
        assert_eq!(code, 0, "{extra:?}: {out}");
        assert_eq!(qemu(p, &["check", ours]).0, 0, "{extra:?}");
        assert_eq!(
            qemu(p, &["map", "--output=json", ours]),
            qemu(p, &["map", "--output=json", theirs]),
            "{extra:?}"
        );
    }
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "top.qcow2",
        "y.qcow2",
    ];
    same(p, &args);
}

/// `convert -n` of zeros over a qcow2 target full of data releases the clusters it frees
/// from the file, as qemu-img's unmapping zero writes do: the host gets its space back.
#[test]
fn convert_n_of_zeros_gives_the_space_back_like_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::File::create(p.join("zeros.raw"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    qcow2_image(p, &[], "full.qcow2", "16M", &["write -P 9 0 16M"]);
    let allocated = |img: &str| std::fs::metadata(p.join(img)).unwrap().blocks() * 512;
    for (tool, img) in [
        (env!("CARGO_BIN_EXE_qimg"), "ours.qcow2"),
        ("qemu-img", "theirs.qcow2"),
    ] {
        std::fs::copy(p.join("full.qcow2"), p.join(img)).unwrap();
        let args = ["convert", "-n", "-O", "qcow2", "zeros.raw", img];
        assert_eq!(run(p, tool, &args).0, 0, "{tool}");
        assert_eq!(qemu(p, &["check", img]).0, 0, "{tool}");
        assert_eq!(qemu(p, &["compare", "zeros.raw", img]).0, 0, "{tool}");
    }
    let (ours, theirs) = (allocated("ours.qcow2"), allocated("theirs.qcow2"));
    assert!(
        ours < 1 << 20 && theirs < 1 << 20,
        "{ours} vs {theirs} bytes"
    );
}

#[test]
fn convert_into_an_existing_target_and_progress_output() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    mixed_raw(p, "src.raw");
    // -n over an image full of other data: the zeros of the source must be written too.
    qcow2_image(p, &[], "t.qcow2", "6M", &["write -P 9 0 6M"]);
    assert_eq!(
        qimg(p, &["convert", "-n", "-O", "qcow2", "src.raw", "t.qcow2"]).0,
        0
    );
    assert_eq!(qemu(p, &["check", "t.qcow2"]).0, 0);
    // The first 5M + 1000 bytes match the source; qemu-img compare checks the rest is zero
    // only in strict mode, so compare a raw copy of the head.
    qemu(p, &["convert", "-O", "raw", "t.qcow2", "t.raw"]);
    let a = std::fs::read(p.join("src.raw")).unwrap();
    let b = std::fs::read(p.join("t.raw")).unwrap();
    assert_eq!(a[..], b[..a.len()]);
    // A hole of many convert chunks (4 MiB each) over data: zeroed as a whole.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(p.join("holes.raw")).unwrap();
        f.set_len(40 << 20).unwrap();
        f.write_all_at(&[7; 65536], 0).unwrap();
        f.write_all_at(&[8; 65536], (40 << 20) - 65536).unwrap();
    }
    qcow2_image(p, &[], "h.qcow2", "40M", &["write -P 9 0 40M"]);
    let args = ["convert", "-n", "-O", "qcow2", "holes.raw", "h.qcow2"];
    assert_eq!(qimg(p, &args).0, 0);
    assert_eq!(qemu(p, &["check", "h.qcow2"]).0, 0);
    assert_eq!(qemu(p, &["compare", "holes.raw", "h.qcow2"]).0, 0);
    // -p when stdout is not a terminal: qemu-img's form.
    let (code, out) = qimg(p, &["convert", "-p", "-O", "qcow2", "src.raw", "p.qcow2"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    assert!(
        qimg(p, &["convert", "-q", "-p", "-O", "raw", "src.raw", "q.raw"])
            .1
            .is_empty()
    );
    assert_eq!(
        qimg(
            p,
            &["convert", "-t", "bogus", "-O", "raw", "src.raw", "q.raw"]
        )
        .0,
        1
    );
}

/// A raw image of `mib` MiB: every other MiB holds compressible text (words from a fixed
/// pseudo-random sequence), the rest is a hole.
fn text_raw(dir: &Path, name: &str, mib: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let words = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "snapshot ",
        "L2 ",
        "zlib ",
    ];
    let mut state = 1u64;
    let mut data = vec![0u8; (mib << 20) as usize];
    for m in (0..mib as usize).step_by(2) {
        let mut text = Vec::with_capacity(1 << 20);
        while text.len() < 1 << 20 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.extend_from_slice(words[(state >> 60) as usize % words.len()].as_bytes());
        }
        data[m << 20..(m + 1) << 20].copy_from_slice(&text[..1 << 20]);
    }
    let f = std::fs::File::create(dir.join(name)).unwrap();
    f.set_len(mib << 20).unwrap();
    for m in (0..mib as usize).step_by(2) {
        f.write_all_at(&data[m << 20..(m + 1) << 20], (m << 20) as u64)
            .unwrap();
    }
    data
}

/// A target on a file system that fills up: both tools exit 1 with nothing on stdout, and
/// qimg names the target and the failing write the way qemu-img words it ("error while
/// writing at byte N: No space left on device"). The qcow2 targets, new or filled with
/// `-n`, check clean: what was written is mapped, and nothing leaks.
#[test]
fn convert_onto_a_full_file_system_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // Every other MiB is data: 6 MiB of it, on a 4 MiB file system.
    text_raw(p, "src.raw", 12);
    let fs = cowbird_tests::small_fs::SmallFs::mount(4 << 20);
    for fmt in ["qcow2", "raw"] {
        let target = fs.path().join(format!("t.{fmt}"));
        let t = target.to_str().unwrap();
        let args = ["convert", "-O", fmt, "src.raw", t];
        let mut results = Vec::new();
        for tool in ["qemu-img", env!("CARGO_BIN_EXE_qimg")] {
            let _ = std::fs::remove_file(&target);
            results.push(run(p, tool, &args));
        }
        assert_eq!(results[0], (1, String::new()), "qemu-img {args:?}");
        assert_eq!(results[1], results[0], "qimg vs qemu-img for {args:?}");
        let _ = std::fs::remove_file(&target);
        let err = qimg_stderr(p, &args);
        assert!(
            err.contains(&format!("{t}: error while writing at byte "))
                && err.contains("No space left on device")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        if fmt == "qcow2" {
            // What was written is mapped, and the clusters reserved for the rest are given
            // back: no leaks, as with qemu-img.
            let (code, out) = cowbird_tests::qemu_check(&target);
            assert_eq!(code, 0, "qemu-img check:\n{out}");
        }
        std::fs::remove_file(&target).unwrap();
    }
    let target = fs.path().join("existing.qcow2");
    let t = target.to_str().unwrap();
    qemu(p, &["create", "-q", "-f", "qcow2", t, "12M"]);
    let _filler = fs.fill("filler", 2 << 20);
    let args = ["convert", "-n", "-O", "qcow2", "src.raw", t];
    let err = qimg_stderr(p, &args);
    assert!(err.contains("No space left on device"), "{err}");
    // What was written is mapped: the new tables' space was claimed as they came.
    let (code, out) = cowbird_tests::qemu_check(&target);
    assert_eq!(code, 0, "qemu-img check:\n{out}");
    std::fs::remove_file(&target).unwrap();
    // The same for new targets with subclusters (no whole clusters reserved ahead) and
    // with small clusters (many reservations, given back when their writes fail).
    for option in ["extended_l2=on", "cluster_size=4096"] {
        let _ = std::fs::remove_file(&target);
        let args = ["convert", "-O", "qcow2", "-o", option, "src.raw", t];
        let err = qimg_stderr(p, &args);
        assert!(err.contains("No space left on device"), "{option}: {err}");
        let (code, out) = cowbird_tests::qemu_check(&target);
        assert_eq!(code, 0, "{option}: qemu-img check:\n{out}");
    }
}

/// Header oddities read as QEMU reads them: a backing file name that starts with NUL (or an
/// offset of 0 with the format extension left) is no backing file; a snapshot written by
/// QEMU 4.2 or older (16 bytes of extra data, no icount) shows "--" for it; a tag in UTF-8
/// is padded by bytes, as printf pads. Same output as qemu-img's.
#[test]
fn header_oddities_read_as_qemu_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "b.qcow2", "1M", &[]);
    qcow2_over(p, "b.qcow2", "nul_name.qcow2", "", &[]);
    let be64 = |img: &str, at: usize| {
        let bytes = std::fs::read(p.join(img)).unwrap();
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    };
    patch(p, "nul_name.qcow2", be64("nul_name.qcow2", 8), &[0; 8]);
    qcow2_over(p, "b.qcow2", "no_offset.qcow2", "", &[]);
    patch(p, "no_offset.qcow2", 8, &[0; 8]);
    qcow2_image(p, &[], "old_snap.qcow2", "1M", &[]);
    qemu(p, &["snapshot", "-c", "ünïcødé 😀", "old_snap.qcow2"]);
    // The snapshot entry with 16 bytes of extra data: the fields after them move up.
    let table = be64("old_snap.qcow2", 64);
    let bytes = std::fs::read(p.join("old_snap.qcow2")).unwrap();
    let entry = &bytes[table as usize..];
    let be16 = |at: usize| u16::from_be_bytes(entry[at..at + 2].try_into().unwrap()) as usize;
    let extra = u32::from_be_bytes(entry[36..40].try_into().unwrap()) as usize;
    let names = 40 + extra..40 + extra + be16(12) + be16(14);
    let mut old = [
        &entry[..36],
        &16u32.to_be_bytes(),
        &entry[40..56],
        &entry[names],
    ]
    .concat();
    old.resize(old.len().next_multiple_of(8) + 8, 0);
    patch(p, "old_snap.qcow2", table, &old);
    for img in ["nul_name.qcow2", "no_offset.qcow2", "old_snap.qcow2"] {
        for args in [
            &["info", img][..],
            &["info", "--output=json", img],
            &["check", img],
            &["map", img],
            &["snapshot", "-l", img],
        ] {
            same(p, args);
        }
    }
    let listing = qemu(p, &["snapshot", "-l", "old_snap.qcow2"]).1;
    assert!(listing.contains(" --\n"), "{listing}");
    // A header length that is no multiple of 8 (QEMU accepts it) survives a header rewrite:
    // the extensions stay where readers look (8-byte steps from the first one).
    qcow2_over(p, "b.qcow2", "odd_header.qcow2", "", &[]);
    let mut bytes = std::fs::read(p.join("odd_header.qcow2")).unwrap();
    let header_length = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let name_at = be64("odd_header.qcow2", 8) as usize;
    let name_len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
    // Four more header bytes; the extensions and the name move up inside cluster 0.
    let tail = bytes[header_length..name_at + name_len].to_vec();
    bytes[header_length..header_length + 4].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
    bytes[header_length + 4..header_length + 4 + tail.len()].copy_from_slice(&tail);
    bytes[100..104].copy_from_slice(&(header_length as u32 + 4).to_be_bytes());
    bytes[8..16].copy_from_slice(&(name_at as u64 + 4).to_be_bytes());
    std::fs::write(p.join("odd_header.qcow2"), &bytes).unwrap();
    assert!(qemu(p, &["info", "odd_header.qcow2"])
        .1
        .contains("backing file: b.qcow2"));
    assert_eq!(qimg(p, &["resize", "odd_header.qcow2", "2M"]).0, 0);
    let (code, info) = qemu(p, &["info", "odd_header.qcow2"]);
    assert_eq!(code, 0, "{info}");
    assert!(
        info.contains("backing file: b.qcow2") && info.contains("2 MiB"),
        "{info}"
    );
    assert_eq!(qemu(p, &["check", "odd_header.qcow2"]).0, 0);
}

/// Images in formats qemu-img knows and qimg does not serve are refused by name, never read
/// as raw (a conversion copied the container's bytes as the disk's, with exit code 0); named
/// raw with `-f raw`, they are raw files as for qemu-img.
#[test]
fn other_formats_are_refused_not_read_as_raw() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for format in ["vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "luks"] {
        let img = format!("x.{format}");
        let mut create = vec!["create", "-q", "-f", format];
        if format == "luks" {
            create.extend([
                "--object",
                "secret,id=s,data=x",
                "-o",
                "key-secret=s,iter-time=10",
            ]);
        }
        create.extend([img.as_str(), "10M"]);
        assert_eq!(qemu(p, &create).0, 0, "{format}");
        for args in [
            &["info", "X"][..],
            &["check", "X"],
            &["map", "X"],
            &["convert", "-O", "qcow2", "X", "o.qcow2"],
            &["compare", "X", "X"],
        ] {
            let args = with_name(args, &img);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &args);
            // compare's code for an error is 2.
            let failed = if args[0] == "compare" { 2 } else { 1 };
            assert_eq!(code, failed, "{args:?}: {err}");
            let want = format!("Could not open '{img}': Image format '{format}' is not supported");
            assert!(err.contains(&want), "{args:?}: {err}");
        }
        assert!(!p.join("o.qcow2").exists(), "{format}");
        same(p, &["info", "-f", "raw", &img]);
    }
    // Named with -f or -O, such formats are unsupported, not unknown ("Unknown driver
    // 'vmdk'" said qimg).
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    let unsupported = "Image format 'vmdk' is not supported";
    for args in [
        &["info", "-f", "vmdk", "a.qcow2"][..],
        &["convert", "-O", "vmdk", "a.qcow2", "o.vmdk"],
        &["convert", "-n", "-O", "vmdk", "a.qcow2", "a.qcow2"],
        &["create", "-f", "vmdk", "o.vmdk", "1M"],
    ] {
        let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(unsupported), "{args:?}: {err}");
    }
    let (_, _, err) = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &["info", "-f", "vmdx", "a.qcow2"],
    );
    assert!(err.contains("Unknown driver 'vmdx'"), "{err}");
}

/// Output to a closed stdout or stderr is dropped, as qemu-img drops it (it ignores SIGPIPE
/// and print errors): the exit code is the command's (`check 2>&1 | head -1` got 101, a
/// panic, for check's exit code 3).
#[test]
fn closed_output_pipes_keep_the_exit_code_like_qemu_img() {
    use std::process::Stdio;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    for (args, code) in [
        (&["info", "missing.qcow2"][..], 1),
        (&["info", "a.qcow2"], 0),
        (&["check", "a.qcow2"], 0),
        (&["nonsense"], 1),
    ] {
        for tool in ["qemu-img", env!("CARGO_BIN_EXE_qimg")] {
            let mut child = Command::new(tool)
                .current_dir(p)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Both pipes closed before the tool writes anything.
            drop(child.stdout.take());
            drop(child.stderr.take());
            let status = child.wait().unwrap();
            assert_eq!(status.code(), Some(code), "{tool} {args:?}: {status}");
        }
    }
}

/// A preallocation that runs out of space gives the space back, as qemu-img's does: a raw
/// file keeps its old length (0 for a new one), a qcow2 image its old size, clusters and
/// file length, and both tools fail with exit code 1.
#[test]
fn a_preallocation_that_runs_out_of_space_gives_it_back_like_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let fs = cowbird_tests::small_fs::SmallFs::mount(20 << 20);
    let p = fs.path();
    let (raw, qcow2) = (p.join("t.raw"), p.join("t.qcow2"));
    let raw_len = || std::fs::metadata(&raw).unwrap().len();
    for tool in ["qemu-img", env!("CARGO_BIN_EXE_qimg")] {
        qemu(p, &["create", "-q", "-f", "raw", "t.raw", "8M"]);
        let args = [
            "resize",
            "-f",
            "raw",
            "--preallocation=full",
            "t.raw",
            "64M",
        ];
        assert_eq!(run(p, tool, &args).0, 1, "{tool}");
        assert_eq!(raw_len(), 8 << 20, "{tool}");
        std::fs::remove_file(&raw).unwrap();
        let args = [
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "t.raw",
            "64M",
        ];
        assert_eq!(run(p, tool, &args).0, 1, "{tool}");
        assert_eq!(raw_len(), 0, "{tool}");
        std::fs::remove_file(&raw).unwrap();
        qemu(p, &["create", "-q", "-f", "qcow2", "t.qcow2", "8M"]);
        let args = ["resize", "--preallocation=full", "t.qcow2", "64M"];
        assert_eq!(run(p, tool, &args).0, 1, "{tool}");
        let info = qemu(p, &["info", "t.qcow2"]).1;
        assert!(info.contains("virtual size: 8 MiB"), "{tool}: {info}");
        assert_eq!(qemu(p, &["check", "t.qcow2"]).0, 0, "{tool}");
        let used = std::fs::metadata(&qcow2).unwrap().blocks() * 512;
        assert!(used < 1 << 20, "{tool}: {used} bytes still used");
        std::fs::remove_file(&qcow2).unwrap();
    }
}

/// Growing an image whose L1 table then outgrows its cluster, on a file system with 16 KiB
/// left: the new table takes the sectors it needs (8000 bytes for 500 GiB), as qemu-img
/// writes it, not a whole 64 KiB cluster, so the resize succeeds as qemu-img's does.
#[test]
fn a_large_grow_fits_on_a_nearly_full_file_system_like_qemu_img() {
    let fs = cowbird_tests::small_fs::SmallFs::mount(8 << 20);
    let p = fs.path();
    qemu(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    for img in ["ours.qcow2", "theirs.qcow2"] {
        std::fs::copy(p.join("base.qcow2"), p.join(img)).unwrap();
    }
    // Fill the file system, then give 16 KiB back.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(p.join("filler")).unwrap();
        while filler.write_all(&[0x5a; 4096]).is_ok() {}
        let len = filler.metadata().unwrap().len();
        filler.set_len(len - (16 << 10)).unwrap();
    }
    for (tool, img) in [
        ("qemu-img", "theirs.qcow2"),
        (env!("CARGO_BIN_EXE_qimg"), "ours.qcow2"),
    ] {
        let (code, out) = run(p, tool, &["resize", img, "500G"]);
        assert_eq!(code, 0, "{tool}: {out}");
        assert_eq!(qemu(p, &["check", img]).0, 0, "{tool}");
    }
    assert_eq!(
        info_sans_sizes(p, "ours.qcow2", "ours.qcow2"),
        info_sans_sizes(p, "theirs.qcow2", "theirs.qcow2")
    );
}

/// Runs `qimg convert -p ARGS` and sends `sig` once its progress passed 1%. Returns the
/// bytes the interrupted convert reports as converted, or `None` if it finished first.
fn interrupt_convert(dir: &Path, args: &[&str], sig: i32) -> Option<u64> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .current_dir(dir)
        .args(["convert", "-p"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut byte = [0u8; 1];
    // Progress lines are `    (P/100%)\r`; wait for one past 1%.
    while !seen
        .split('\r')
        .filter_map(|l| l.trim().strip_prefix('(')?.split('/').next()?.parse().ok())
        .any(|p: f64| p > 1.0)
    {
        if stdout.read(&mut byte).unwrap() == 0 {
            break;
        }
        seen.push(byte[0] as char);
    }
    // SAFETY: a signal to our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return None;
    }
    assert_eq!(
        out.status.signal(),
        Some(sig),
        "dies of the signal: {stderr}"
    );
    let target = args.last().unwrap();
    let done = stderr
        .split_once(&format!("'{target}' is consistent and holds the first "))
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok());
    Some(done.unwrap_or_else(|| panic!("no interruption message: {stderr}")))
}

#[test]
fn an_interrupted_convert_leaves_a_consistent_prefix() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let data = text_raw(p, "src.raw", 64);
    qemu(p, &["convert", "-c", "-O", "qcow2", "src.raw", "src.qcow2"]);
    for (sig, args) in [
        (
            libc::SIGINT,
            &["-c", "-O", "qcow2", "src.raw", "out.qcow2"][..],
        ),
        (
            libc::SIGTERM,
            &["-m", "1", "-O", "raw", "src.qcow2", "out.raw"],
        ),
    ] {
        let target = *args.last().unwrap();
        let done = (0..5)
            .find_map(|_| {
                let _ = std::fs::remove_file(p.join(target));
                interrupt_convert(p, args, sig)
            })
            .expect("qimg convert always finished before the signal");
        assert!(done > 0 && done < data.len() as u64, "{args:?}: {done}");
        if target.ends_with("qcow2") {
            let (code, out) = qemu(p, &["check", target]);
            assert_eq!(code, 0, "{args:?}: {out}");
        }
        // The target reads as the first `done` bytes of the source, then zeros.
        assert_eq!(qemu(p, &["convert", "-O", "raw", target, "got.raw"]).0, 0);
        let got = std::fs::read(p.join("got.raw")).unwrap();
        let done = done as usize;
        assert_eq!(got.len(), data.len(), "{args:?}");
        assert!(got[..done] == data[..done], "{args:?}: the prefix differs");
        assert!(
            got[done..].iter().all(|&b| b == 0),
            "{args:?}: data past {done}"
        );
    }
}

/// A signal stops a rate-limited convert at once, not when its writers' waits for the rate
/// are over (at 1 MiB/s the writer of the second 4 MiB chunk waits 4 s, of the third 8 s).
#[test]
fn a_rate_limited_convert_stops_at_once_on_a_signal() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    text_raw(p, "src.raw", 64);
    let start = std::time::Instant::now();
    let args = ["-r", "1M", "-O", "qcow2", "src.raw", "out.qcow2"];
    let done = interrupt_convert(p, &args, libc::SIGINT).expect("finished before the signal");
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    assert!(done > 0, "{done}");
    let (code, out) = qemu(p, &["check", "out.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// qimg's stderr for `args`.
fn qimg_stderr(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `s.qcow2` (80M) with data, snapshot "2" (ID 1), more data, snapshot "b" (ID 2), more data,
/// then grown: `-l 2` tells IDs first from names first. Also `r.raw`, without snapshots.
fn snapshot_images(p: &Path) {
    qcow2_image(
        p,
        &[],
        "s.qcow2",
        "64M",
        &["write -P 1 0 1M", "write -P 2 60M 1M"],
    );
    qemu(p, &["snapshot", "-c", "2", "s.qcow2"]);
    qemu_io(
        p,
        "s.qcow2",
        &["write -P 3 0 512k", "write -c -P 5 8M 128k"],
    );
    qemu(p, &["snapshot", "-c", "b", "s.qcow2"]);
    qemu_io(p, "s.qcow2", &["write -z 0 1M", "write -P 9 30M 64k"]);
    qemu(p, &["resize", "-q", "s.qcow2", "80M"]);
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
}

#[test]
fn convert_and_measure_read_internal_snapshots_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    snapshot_images(p);
    let mut contents = Vec::new();
    for l in [
        &["-l", "1"][..],
        &["-l", "2"],
        &["-l", "b"],
        &["-s", "b"],
        &["-l", "snapshot.id=1"],
        &["-l", "snapshot.name=2"],
        &["-l", "snapshot.id=2,snapshot.name=b"],
        &[],
    ] {
        for fmt in ["raw", "qcow2"] {
            let a = [&["convert", "-O", fmt][..], l, &["s.qcow2"]].concat();
            assert_eq!(qimg(p, &[&a[..], &["ours"]].concat()).0, 0, "{a:?}");
            // qemu-img 10 has no -s: its -l takes the same bare ID or name.
            let theirs = [&a[..], &["theirs"]].concat().join(" ").replace("-s", "-l");
            let theirs: Vec<&str> = theirs.split(' ').collect();
            assert_eq!(qemu(p, &theirs).0, 0, "{a:?}");
            assert_eq!(qemu(p, &["compare", "ours", "theirs"]).0, 0, "{a:?}");
            if fmt == "raw" {
                let ours = std::fs::read(p.join("ours")).unwrap();
                assert!(ours == std::fs::read(p.join("theirs")).unwrap(), "{a:?}");
                contents.push(ours);
            } else {
                assert_eq!(
                    qemu(p, &["map", "--output=json", "ours"]),
                    qemu(p, &["map", "--output=json", "theirs"]),
                    "{a:?}"
                );
            }
        }
        if !l.is_empty() && l[0] == "-l" {
            for out in ["--output=human", "--output=json"] {
                same(p, &["measure", out, "-O", "qcow2", l[0], l[1], "s.qcow2"]);
            }
        }
    }
    // Which state each case read: snapshot ID 1, ID 2 or the current one, all different.
    let state = [1, 2, 2, 2, 1, 1, 2, 0];
    for (i, a) in contents.iter().enumerate() {
        for (j, b) in contents.iter().enumerate() {
            assert_eq!(a == b, state[i] == state[j], "cases {i} and {j}");
        }
    }
    for args in [
        &["convert", "-l", "nosuch", "s.qcow2", "x"][..],
        &[
            "convert",
            "-l",
            "snapshot.id=1,snapshot.name=b",
            "s.qcow2",
            "x",
        ],
        &["convert", "-l", "snapshot.foo=1", "s.qcow2", "x"],
        &["convert", "-l", "1", "s.qcow2", "s.qcow2", "x"],
        &["convert", "-l", "1", "r.raw", "x"],
        &["measure", "-l", "nosuch", "s.qcow2"],
        &["measure", "-l", "1", "r.raw"],
        &["measure", "-l", "1", "--size", "1G"],
        &["measure", "-f", "qcow2"],
    ] {
        same(p, args);
    }
    let err = qimg_stderr(p, &["convert", "-l", "nosuch", "s.qcow2", "x"]);
    assert!(
        err.contains("Failed to load snapshot: Can't find snapshot"),
        "{err}"
    );
}

/// `bytes` as text, bytes that are not UTF-8 as `\xNN` escapes (so that outputs that differ
/// only there still differ).
fn lossless(bytes: &[u8]) -> String {
    bytes
        .utf8_chunks()
        .map(|c| format!("{}{}", c.valid(), c.invalid().escape_ascii()))
        .collect()
}

/// Exit code, stdout and stderr of `tool` in `dir`, with the program name at the start of
/// stderr lines (and in "Try 'PROG info --help'") written as `PROG` and `bench`'s run time
/// as `T`.
fn run_with_stderr<S: AsRef<OsStr>>(
    dir: &Path,
    tool: &str,
    prog: &str,
    args: &[S],
) -> (i32, String, String) {
    let out = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let stderr = lossless(&out.stderr)
        .lines()
        .map(|l| l.replace(&format!("'{prog} "), "'PROG "))
        .map(|l| match l.strip_prefix(prog) {
            // "qemu-img: ..." and getopt's "qemu-img info: ...".
            Some(rest) if rest.starts_with(": ") || rest.starts_with(' ') => {
                format!("PROG{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let stdout = lossless(&out.stdout)
        .lines()
        .map(|l| match l.starts_with("Run completed in ") {
            true => "Run completed in T seconds.\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// Every size and count argument is read by QEMU's grammar (fractions, hex, "1e" is an
/// exabyte so "1e3" is garbage, counts take no suffix) and refused with qemu-img's words.
#[test]
fn size_and_count_arguments_are_read_and_refused_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &["write -P 7 0 64k"]);
    let values = [
        "1.5",
        "1e3",
        "abc",
        "0x10",
        "0x10k",
        "16E",
        "8E",
        "1.k",
        " 2k",
        ".5k",
        "5 ",
        "3G",
        "1.5b",
        "99999999999999999999",
        "010",
    ];
    for v in values {
        let o_size = format!("size={v}");
        let o_cluster = format!("cluster_size={v}");
        let bs = format!("bs={v}");
        let count = format!("count={v}");
        let skip = format!("skip={v}");
        let cases: [&[&str]; 16] = [
            &["create", "-f", "raw", "new.img", v],
            &["create", "-f", "qcow2", "-o", &o_size, "new.img"],
            &["create", "-f", "qcow2", "-o", &o_cluster, "new.img", "1M"],
            &["measure", "-O", "qcow2", "--size", v],
            &["measure", "-O", "qcow2", "-o", &o_cluster, "--size", "1M"],
            &["map", "--start-offset", v, "a.qcow2"],
            &["map", "--max-length", v, "a.qcow2"],
            &["convert", "-S", v, "-O", "raw", "a.qcow2", "out.img"],
            &[
                "convert", "-O", "qcow2", "-o", &o_cluster, "a.qcow2", "out.img",
            ],
            &["dd", "-O", "raw", &bs, "if=a.qcow2", "of=out.img"],
            &["dd", "-O", "raw", &count, "if=a.qcow2", "of=out.img"],
            &["dd", "-O", "raw", &skip, "if=a.qcow2", "of=out.img"],
            &["bench", "-c", v, "-d", "1", "a.qcow2"],
            &["bench", "-c", "1", "-d", v, "a.qcow2"],
            &["bench", "-c", "1", "-s", v, "a.qcow2"],
            &["commit", "-r", v, "a.qcow2"],
        ];
        for args in cases {
            same_outputs(p, args, &["new.img", "out.img"]);
        }
        // resize: sizes are QEMU options here (`Parameter 'size' expects ...`); a growth
        // prints the same line for both tools.
        let plus = format!("+{v}");
        for size in [v, plus.as_str()] {
            let (code, _) = qemu(p, &["create", "-q", "-f", "raw", "r.img", "1M"]);
            assert_eq!(code, 0);
            let outcomes = run_on_copies(p, "r.img", &["resize", "-f", "raw", "X", size], |c| {
                std::fs::metadata(p.join(c)).unwrap().len()
            });
            assert_eq!(outcomes[0], outcomes[1], "resize {size}");
        }
    }
}

/// Runs `args` through both tools, each writing its own copies of the files named in
/// `outputs` (names replaced inside the arguments too): the same exit code, stdout and
/// stderr, and the same files: none, or equal in format, virtual size and contents (and
/// length for raw files; qimg pads a new qcow2 file to whole clusters).
fn same_outputs(dir: &Path, args: &[&str], outputs: &[&str]) {
    let mut results = Vec::new();
    for (tool, prog, prefix) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg", "ours-"),
        ("qemu-img", "qemu-img", "theirs-"),
    ] {
        let renamed = |a: &str| {
            outputs
                .iter()
                .fold(a.to_owned(), |a, o| a.replace(o, &format!("{prefix}{o}")))
        };
        for o in outputs {
            let _ = std::fs::remove_file(dir.join(renamed(o)));
        }
        let a: Vec<String> = args.iter().map(|a| renamed(a)).collect();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, out, err) = run_with_stderr(dir, tool, prog, &a);
        let files: Vec<Option<(Option<u64>, String)>> = outputs
            .iter()
            .map(|o| {
                let f = renamed(o);
                let len = std::fs::metadata(dir.join(&f)).ok()?.len();
                let info = qemu(dir, &["info", "-U", &f]).1;
                let raw = info.contains("file format: raw");
                let lines = info
                    .lines()
                    .filter(|l| l.starts_with("virtual size") || l.starts_with("file format"));
                Some((raw.then_some(len), lines.collect::<Vec<_>>().join("\n")))
            })
            .collect();
        results.push((
            code,
            out.replace(prefix, ""),
            err.replace(prefix, ""),
            files,
        ));
    }
    assert_eq!(
        results[0], results[1],
        "qimg vs qemu-img differ for {args:?}"
    );
    for (o, file) in outputs.iter().zip(&results[0].3) {
        if file.is_some() {
            let (ours, theirs) = (format!("ours-{o}"), format!("theirs-{o}"));
            let (code, out) = qemu(dir, &["compare", "-U", &ours, &theirs]);
            assert_eq!(code, 0, "{args:?}: {out}");
        }
    }
}

/// A qemu-io holding `img` open (read-write unless `read_only`) until dropped.
struct QemuIoHolding(std::process::Child);

impl QemuIoHolding {
    fn new(dir: &Path, img: &str, format: &str, read_only: bool) -> QemuIoHolding {
        let mut cmd = Command::new("qemu-io");
        cmd.current_dir(dir).args(["-f", format]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(img)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        // Its locks are taken at open; wait until they are there.
        let ino = std::fs::metadata(dir.join(img)).unwrap().ino();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked {img}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        QemuIoHolding(child)
    }
}

impl Drop for QemuIoHolding {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Images QEMU uses are refused with qemu-img's words (QEMU's byte-range locks are honoured
/// both ways), `-U` reads anyway, and converting an image onto itself is refused instead of
/// destroying it.
#[test]
fn images_in_use_are_refused_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &["write -P 7 0 64k"]);
    {
        let _writer = QemuIoHolding::new(p, "a.qcow2", "qcow2", false);
        for args in [
            &["info", "a.qcow2"][..],
            &["info", "-U", "a.qcow2"],
            &["check", "a.qcow2"],
            &["check", "-U", "a.qcow2"],
            &["map", "a.qcow2"],
            &["measure", "-O", "qcow2", "a.qcow2"],
            &["compare", "a.qcow2", "a.qcow2"],
            &["convert", "-O", "raw", "a.qcow2", "out.raw"],
            &["resize", "a.qcow2", "2M"],
            &["rebase", "-u", "-b", "", "a.qcow2"],
            &["create", "-f", "qcow2", "a.qcow2", "1M"],
        ] {
            same(p, args);
        }
    }
    {
        // A writer of a backing file keeps out whoever opens the chain to write its top.
        qcow2_over(p, "a.qcow2", "t.qcow2", "1M", &[]);
        qcow2_image(p, &[], "n.qcow2", "1M", &[]);
        let _writer = QemuIoHolding::new(p, "a.qcow2", "qcow2", false);
        for args in [
            &["rebase", "-b", "", "t.qcow2"][..],
            &["rebase", "-b", "n.qcow2", "-F", "qcow2", "t.qcow2"],
            &["resize", "t.qcow2", "2M"],
            &["amend", "-o", "lazy_refcounts=on", "t.qcow2"],
            &["snapshot", "-c", "s", "t.qcow2"],
            &["commit", "-d", "t.qcow2"],
        ] {
            let (code, _, _) = run_with_stderr(p, "qemu-img", "qemu-img", args);
            assert_eq!(code, 1, "{args:?}");
            same(p, args);
        }
        // -U shares the new backing file only.
        assert_eq!(same_code(p, &["rebase", "-U", "-b", "", "t.qcow2"]), 1);
        qcow2_over(p, "n.qcow2", "u.qcow2", "1M", &[]);
        same(p, &["rebase", "-b", "a.qcow2", "-F", "qcow2", "u.qcow2"]);
        assert_eq!(
            same_code(
                p,
                &["rebase", "-U", "-b", "a.qcow2", "-F", "qcow2", "u.qcow2"]
            ),
            0
        );
    }
    {
        // A reader keeps writers out.
        let _reader = QemuIoHolding::new(p, "a.qcow2", "qcow2", true);
        same(p, &["info", "a.qcow2"]);
        same(p, &["resize", "a.qcow2", "2M"]);
        same(p, &["check", "-r", "all", "a.qcow2"]);
    }
    // Onto itself: refused before the target is truncated, for both formats.
    let (code, _) = qemu(p, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    assert_eq!(code, 0);
    for (img, fmt) in [("a.qcow2", "qcow2"), ("a.raw", "raw")] {
        let before = std::fs::read(p.join(img)).unwrap();
        same(p, &["convert", "-O", fmt, img, img]);
        assert_eq!(std::fs::read(p.join(img)).unwrap(), before, "{img} changed");
    }
    // Our own locks keep QEMU out: a qimg check -r in flight would show as a lock conflict,
    // so hold one the way qimg takes it, through the library, and ask qemu-img.
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(p.join("a.qcow2"))
        .unwrap();
    qcow2::lock::lock_image_file(
        &file,
        &p.join("a.qcow2"),
        qcow2::Locking::On,
        qcow2::Format::Qcow2,
        true,
    )
    .unwrap();
    let out = Command::new("qemu-img")
        .current_dir(p)
        .args(["info", "a.qcow2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` with both tools, each on a copy of the image named last, checks that they
/// exit with the same code and returns it.
fn same_code(dir: &Path, args: &[&str]) -> i32 {
    let image = *args.last().expect("an image");
    let codes: Vec<i32> = ["qemu-img", env!("CARGO_BIN_EXE_qimg")]
        .iter()
        .map(|tool| {
            std::fs::copy(dir.join(image), dir.join("copy.qcow2")).unwrap();
            let args: Vec<&str> = args
                .iter()
                .map(|a| if *a == image { "copy.qcow2" } else { a })
                .collect();
            run(dir, tool, &args).0
        })
        .collect();
    assert_eq!(codes[0], codes[1], "{args:?}");
    codes[0]
}

/// With `data_file_raw=on` the data file is a standalone raw image, so every cluster maps
/// onto it from the start (QEMU preallocates the metadata): bytes written into the data file
/// directly read back through the qcow2 image. The new data file stays sparse, as QEMU's:
/// qimg wrote zeros over all of it (a 2 GiB image took 2 GiB of disk and 4 s).
#[test]
fn a_raw_data_file_is_mapped_from_creation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let sparse = |name: &str| {
        let used = std::fs::metadata(p.join(name)).unwrap().blocks() * 512;
        assert!(used <= 64 << 10, "{name} takes {used} bytes of disk");
    };
    for (tool, name) in [("qemu-img", "theirs"), (env!("CARGO_BIN_EXE_qimg"), "ours")] {
        let opts = format!("data_file={name}-meta.raw,preallocation=metadata");
        let img = format!("{name}-meta.qcow2");
        let (code, _) = run(
            p,
            tool,
            &["create", "-q", "-f", "qcow2", "-o", &opts, &img, "1M"],
        );
        assert_eq!(code, 0, "{tool}");
        sparse(&format!("{name}-meta.raw"));
        let opts = format!("data_file={name}.raw,data_file_raw=on");
        let img = format!("{name}.qcow2");
        let (code, _) = run(
            p,
            tool,
            &["create", "-q", "-f", "qcow2", "-o", &opts, &img, "1M"],
        );
        assert_eq!(code, 0, "{tool}");
        sparse(&format!("{name}.raw"));
        let raw = std::fs::File::options()
            .write(true)
            .open(p.join(format!("{name}.raw")))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&raw, &[0x5a; 65536], 1 << 19).unwrap();
        let (code, out) = run(
            p,
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x5a 512k 64k", &img],
        );
        assert!(code == 0 && !out.contains("failed"), "{name}: {out}");
    }
    let ours = qemu(p, &["map", "--output=json", "ours.qcow2"]);
    let theirs = qemu(p, &["map", "--output=json", "theirs.qcow2"]);
    assert_eq!(ours.1.replace("ours", "X"), theirs.1.replace("theirs", "X"));
    same(p, &["check", "ours.qcow2"]);
}

/// A directory is not an image: refused with QEMU's words, whatever the subcommand and
/// whether a format is given.
#[test]
fn a_directory_is_refused_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir(p.join("adir")).unwrap();
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    for args in [
        &["info", "adir"][..],
        &["info", "-f", "raw", "adir"],
        &["map", "adir"],
        &["check", "adir"],
        &["measure", "-O", "qcow2", "adir"],
        &["convert", "adir", "out.img"],
        &["compare", "adir", "a.qcow2"],
        &["resize", "adir", "1M"],
        &["commit", "adir"],
    ] {
        same(p, args);
    }
}

/// Damaged headers are refused in qemu-img's words.
#[test]
fn damaged_headers_are_refused_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // (name, byte offset, big-endian u32 written there; or a length to truncate to).
    let patches: [(&str, u64, u32); 16] = [
        ("version4", 4, 4),
        ("cluster_bits22", 20, 22),
        ("cluster_bits8", 20, 8),
        ("l1_unaligned", 44, 0x30200),
        ("reftable_unaligned", 52, 0x10100),
        ("refcount_order7", 96, 7),
        ("incompat_bit20", 76, 1 << 20),
        ("l1_huge", 36, 1 << 28),
        ("reftable_clusters0", 56, 0),
        ("snapshots_unaligned", 68, 0x200),
        ("crypt_method3", 32, 3),
        ("compression_bit_alone", 76, 1 << 3),
        ("compression_type255", 104, 0xff00_0000),
        ("header_length113", 100, 113),
        ("extension_too_long", 116, 0x10000),
        ("l1_past_eof", 40, 0x4000_0000),
    ];
    for (name, offset, value) in patches {
        let img = format!("{name}.qcow2");
        qcow2_image(p, &[], &img, "1M", &[]);
        let f = std::fs::File::options()
            .write(true)
            .open(p.join(&img))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &value.to_be_bytes(), offset).unwrap();
        same(p, &["info", &img]);
    }
    // An L1 table past the end of the file reads as zeros, as QEMU reads it: map shows
    // nothing allocated, check reports the table and the clusters it no longer reaches.
    for args in [
        &["check", "l1_past_eof.qcow2"][..],
        &["map", "l1_past_eof.qcow2"],
    ] {
        same(p, args);
    }
    for len in [0, 3, 50] {
        let img = format!("short{len}.qcow2");
        qcow2_image(p, &[], &img, "1M", &[]);
        cut(p, &img, len);
        same(p, &["info", "-f", "qcow2", &img]);
    }
    // Cut inside the header cluster, after the fixed header: the rest of the cluster reads
    // as zeros (QEMU's reads past the end), so the image opens and check reports what the
    // cut took.
    for len in [104, 113, 200, 503] {
        let img = format!("cut{len}.qcow2");
        qcow2_image(p, &[], &img, "1M", &["write 0 256k"]);
        cut(p, &img, len);
        for args in [
            &["info", &img][..],
            &["check", &img],
            &["check", "--output=json", &img],
            &["compare", &img, &img],
        ] {
            same(p, args);
        }
    }
}

/// Cuts the file `name` in `dir` to `len` bytes.
fn cut(dir: &Path, name: &str, len: u64) {
    let f = std::fs::File::options().write(true).open(dir.join(name));
    f.unwrap().set_len(len).unwrap();
}

/// A 64 MiB image laid out as the damaged images below expect: header, refcount table,
/// refcount block, L1 and L2 table in host clusters 0 to 4 (64 KiB each), guest data at 0
/// (256 KiB, host clusters 5 to 8) and at 32 MiB (host cluster 9).
fn layout_qcow2(dir: &Path, name: &str) {
    qcow2_image(
        dir,
        &[],
        name,
        "64M",
        &["write -P 1 0 256k", "write -P 2 32M 64k"],
    );
}

const REFTABLE: u64 = 0x10000;
const REFBLOCK: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

/// Writes `bytes` at `offset` of the file `name`.
fn patch(dir: &Path, name: &str, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// A byte patch: (offset, value, width): `value` big-endian in `width` bytes at `offset`.
type Patch = (u64, u64, usize);

/// A copy of [`layout_qcow2`] with `patches` applied, and the file cut to `len` bytes if
/// given.
fn damaged(dir: &Path, name: &str, patches: &[Patch], len: Option<u64>) {
    layout_qcow2(dir, name);
    for &(offset, value, width) in patches {
        patch(dir, name, offset, &value.to_be_bytes()[8 - width..]);
    }
    if let Some(len) = len {
        cut(dir, name, len);
    }
}

/// `check ARGS X` by both tools, each on its own copy of `img`: the same exit code,
/// stdout and stderr (with the copy named `X`); then `qemu-img check` says the same of
/// both copies. Returns qimg's exit code and stderr.
fn same_check_on_copies(dir: &Path, img: &str, args: &[&str]) -> (i32, String) {
    let mut outcomes = Vec::new();
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let copy = format!("{prog}-{img}");
        std::fs::copy(dir.join(img), dir.join(&copy)).unwrap();
        let a = [&["check"], args, &[copy.as_str()]].concat();
        let (code, out, err) = run_with_stderr(dir, tool, prog, &a);
        let after = run_with_stderr(dir, "qemu-img", "qemu-img", &["check", &copy]);
        let named = |s: String| s.replace(&copy, "X");
        outcomes.push((code, named(out), named(err), after.0, named(after.1)));
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "qimg vs qemu-img: check {args:?} {img}"
    );
    let (code, _, err, _, _) = outcomes.swap_remove(0);
    (code, err)
}

/// An 8-byte L2 entry mapping host `offset` with COPIED set.
const fn copied(offset: u64) -> u64 {
    offset | 1 << 63
}

/// Damaged metadata that `check` reports in QEMU's words and counts: reserved bits in a
/// refcount table or L2 entry, an L2 table on the refcount block, the L1 table on the
/// refcount table, unaligned data and preallocated-zero entries (still counted, spanning
/// two clusters), references past the end of the file.
#[test]
fn check_words_damaged_metadata_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let images: &[(&str, &[Patch], Option<u64>)] = &[
        ("rtentry_unal", &[(REFTABLE, REFBLOCK | 0x100, 8)], None),
        ("l2resv", &[(L2 + 8, copied(0x50002), 8)], None),
        ("l2ovl", &[(L1, copied(REFBLOCK), 8)], None),
        ("l1ovl2", &[(40, REFTABLE, 8)], None),
        ("rb_unal", &[(REFTABLE, REFBLOCK + 0x200, 8)], None),
        ("rb_unal_eof", &[(REFTABLE, 0x10_0200, 8)], None),
        ("l2unal", &[(L2 + 8, copied(0x50200), 8)], None),
        ("zeroflag_unal", &[(L2 + 8, copied(0x50201), 8)], None),
        ("l2eof", &[(L2 + 8, copied(0x500000), 8)], None),
        ("trunc_data", &[], Some(0x60000)),
        ("trunc_l2", &[], Some(0x40100)),
    ];
    for &(name, patches, len) in images {
        let img = format!("{name}.qcow2");
        damaged(p, &img, patches, len);
        same_check_on_copies(p, &img, &[]);
        same_check_on_copies(p, &img, &["--output=json"]);
    }
    // An unaligned refcount block is a corruption event, as in QEMU's driver: reported once
    // on a read-only check ("Image is corrupt"); with -r leaks, where the image is open for
    // writing, the image is marked corrupt.
    let (_, err) = same_check_on_copies(p, "rb_unal.qcow2", &[]);
    assert!(
        err.contains("qcow2: Image is corrupt: Refblock offset 0x20200 unaligned"),
        "{err}"
    );
    // (Also when the unaligned block lies past the end of the file: alignment comes first.)
    for img in ["rb_unal", "rb_unal_eof"] {
        let (code, err) = same_check_on_copies(p, &format!("{img}.qcow2"), &["-r", "leaks"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("qcow2: Marking image as corrupt"), "{err}");
        for copy in [format!("qimg-{img}.qcow2"), format!("qemu-img-{img}.qcow2")] {
            let header = std::fs::read(p.join(&copy)).unwrap();
            assert_eq!(header[79] & 2, 2, "{copy}: corrupt bit not set");
        }
    }
    let expect = [
        (
            "rtentry_unal",
            "ERROR refcount table entry 0 has reserved bits set",
        ),
        (
            "l2resv",
            "ERROR found l2 entry with reserved bits set: 8000000000050002",
        ),
        ("l2ovl", "ERROR refcount block 0 refcount=2"),
        ("l1ovl2", "ERROR refcount block 0 refcount=2"),
        ("l2unal", "Data cluster is not properly aligned"),
        ("l2unal", "ERROR cluster 5 refcount=1 reference=2"),
        (
            "zeroflag_unal",
            "Preallocated cluster is not properly aligned",
        ),
        (
            "l2eof",
            "exceeding the end of the file by one cluster or more: offset 0x500000",
        ),
        ("trunc_data", "offset 0x60000 size 0x10000"),
    ];
    for (name, line) in expect {
        let (code, err) = same_check_on_copies(p, &format!("{name}.qcow2"), &[]);
        assert_eq!(code, 2, "{name}");
        assert!(err.contains(line), "{name}: {err}");
    }
}

/// `-r all` on unaligned L2 entries: a preallocated zero cluster loses its allocation,
/// a data cluster stays counted (so its clusters are not freed); as qemu-img repairs them.
#[test]
fn check_repairs_unaligned_l2_entries_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "data.qcow2", &[(L2 + 8, copied(0x50200), 8)], None);
    damaged(p, "zero.qcow2", &[(L2 + 8, copied(0x50201), 8)], None);
    for img in ["data.qcow2", "zero.qcow2"] {
        for r in ["leaks", "all"] {
            same_check_on_copies(p, img, &["-r", r]);
        }
    }
    let (code, err) = same_check_on_copies(p, "zero.qcow2", &["-r", "all"]);
    assert_eq!(code, 0);
    assert!(
        err.contains("Repairing offset=50200: Preallocated"),
        "{err}"
    );
    // The same entry in an L2 table that is itself unaligned (its L1 entry 512 bytes into
    // the cluster): the repair writes into that table, which is no overlap (qimg took the
    // table for the aligned cluster around it, refused the write and marked the image
    // corrupt).
    qcow2_image(p, &[], "table.qcow2", "1M", &["write -P 0 0 128k"]);
    patch(p, "table.qcow2", L1, &copied(L2 + 0x200).to_be_bytes());
    patch(
        p,
        "table.qcow2",
        L2 + 0x200 + 24,
        &copied(0x50201).to_be_bytes(),
    );
    let (code, err) = same_check_on_copies(p, "table.qcow2", &["-r", "all"]);
    assert_eq!(code, 2, "the L1 entry stays unaligned");
    assert!(
        err.contains("Repairing offset=50200: Preallocated"),
        "{err}"
    );
}

/// `-r leaks` and `-r all` repair what qemu-img repairs with them, with its messages
/// ("Repairing ...", "Rebuilding refcount structure") and exit codes: `-r leaks` also lowers
/// refcounts that are too high and fixes COPIED flags when nothing else is wrong; a zero
/// refcount needs `-r all`.
#[test]
fn check_repair_modes_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let images: &[(&str, &[Patch])] = &[
        ("rc0", &[(REFBLOCK + 2 * 5, 0, 2)]),
        ("rc2", &[(REFBLOCK + 2 * 5, 2, 2)]),
        ("rcl2", &[(REFBLOCK + 2 * 4, 0, 2)]),
        (
            "rcleak",
            &[(REFBLOCK + 2 * 40, 1, 2), (REFBLOCK + 2 * 41, 3, 2)],
        ),
        ("l2dup", &[(L2 + 8, copied(0x50000), 8)]),
        ("l2eof", &[(L2 + 8, copied(0x500000), 8)]),
        ("l2resv", &[(L2 + 8, copied(0x50002), 8)]),
        ("l2ovl", &[(L1, copied(REFBLOCK), 8)]),
        ("l1ovl2", &[(40, REFTABLE, 8)]),
        ("copiedwrong", &[(L2, 0x50000, 8)]),
        ("l1copiedwrong", &[(L1, L2, 8)]),
        // -r all grows the file to hold the block, then rebuilds.
        ("rtentry_eof", &[(REFTABLE, 0x900000, 8)]),
    ];
    for &(name, patches) in images {
        let img = format!("{name}.qcow2");
        damaged(p, &img, patches, None);
        for args in [
            &["-r", "leaks"][..],
            &["-r", "all"],
            &["-r", "all", "--output=json"],
        ] {
            same_check_on_copies(p, &img, args);
        }
    }
    // An L1 table so large that it covers the other metadata: a repair is refused, and the
    // image marked corrupt, with QEMU's line.
    qcow2_image(p, &[], "l1huge.qcow2", "4M", &["write -P 0 0 256k"]);
    patch(p, "l1huge.qcow2", 36, &100_000u32.to_be_bytes());
    // (Only the outputs are compared: qemu-img's refcount repairs before the refusal never
    // reach the file, qimg's do; the image is beyond repair either way.)
    let mut outputs = Vec::new();
    for (tool, prog) in [
        (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ("qemu-img", "qemu-img"),
    ] {
        let own = p.join(prog);
        std::fs::create_dir(&own).unwrap();
        std::fs::copy(p.join("l1huge.qcow2"), own.join("l1huge.qcow2")).unwrap();
        let args = ["check", "-r", "all", "l1huge.qcow2"];
        outputs.push(run_with_stderr(&own, tool, prog, &args));
    }
    assert_eq!(
        outputs[0], outputs[1],
        "qimg vs qemu-img: check -r all l1huge.qcow2"
    );
    let (code, _, err) = &outputs[0];
    assert_eq!(*code, 1, "{err}");
    assert!(
        err.contains("qcow2: Marking image as corrupt: Preventing invalid write on metadata"),
        "{err}"
    );
    let expect = [
        (
            "rc2",
            "leaks",
            0,
            "Repairing cluster 5 refcount=2 reference=1",
        ),
        (
            "copiedwrong",
            "leaks",
            0,
            "Repairing OFLAG_COPIED data cluster",
        ),
        (
            "l1copiedwrong",
            "leaks",
            0,
            "Repairing OFLAG_COPIED L2 cluster",
        ),
        (
            "rc0",
            "leaks",
            1,
            "ERROR need to rebuild refcount structures",
        ),
        ("rc0", "all", 0, "Rebuilding refcount structure"),
        (
            "rtentry_eof",
            "all",
            0,
            "Repairing refcount block 0 is outside image",
        ),
    ];
    for (name, r, code, line) in expect {
        let (c, err) = same_check_on_copies(p, &format!("{name}.qcow2"), &["-r", r]);
        assert_eq!(c, code, "{name} -r {r}: {err}");
        assert!(err.contains(line), "{name} -r {r}: {err}");
    }
}

/// Rebuilt refcount structures go where qemu-img puts them (the first free clusters, here
/// clusters nothing references any more), not always at the end of the file.
#[test]
fn check_repair_places_rebuilt_refcounts_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "l2ovl.qcow2", &[(L1, copied(REFBLOCK), 8)], None);
    damaged(p, "rc0.qcow2", &[(REFBLOCK + 2 * 5, 0, 2)], None);
    for img in ["l2ovl.qcow2", "rc0.qcow2"] {
        same_check_on_copies(p, img, &["-r", "all"]);
        let reftable = |f: &str| std::fs::read(p.join(f)).unwrap()[48..60].to_vec();
        let copy = |tool: &str| format!("{tool}-{img}");
        assert_eq!(
            reftable(&copy("qimg")),
            reftable(&copy("qemu-img")),
            "{img}"
        );
    }
}

/// An image with the corrupt bit set: `-r` opens it for writing, repairs and clears the bit.
#[test]
fn check_repair_clears_the_corrupt_bit_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "a.qcow2", &[(72, 2, 8)], None);
    for r in ["leaks", "all"] {
        assert_eq!(same_check_on_copies(p, "a.qcow2", &["-r", r]).0, 0);
        assert!(qemu(p, &["info", "qimg-a.qcow2"])
            .1
            .contains("corrupt: false"));
    }
    same_check_on_copies(p, "a.qcow2", &[]);
}

/// An image with the corrupt bit set cannot be opened for writing: the same message as
/// qemu-img's (users grep for it), and the image is left alone.
#[test]
fn writing_commands_refuse_an_image_marked_corrupt_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "a.qcow2", &[(72, 2, 8)], None);
    let before = std::fs::read(p.join("a.qcow2")).unwrap();
    for args in [
        &["resize", "a.qcow2", "+1M"][..],
        &["snapshot", "-c", "s", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
        &["rebase", "-u", "-b", "", "a.qcow2"],
    ] {
        same(p, args);
    }
    assert!(std::fs::read(p.join("a.qcow2")).unwrap() == before);
}

/// Fragmentation is counted within each L2 table, as qemu-img counts it: a cluster that
/// starts a table's run is not fragmented, whatever the previous table mapped last.
#[test]
fn check_counts_fragmentation_per_l2_table_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let writes = ["write 0 64k", "write 1G 64k", "write 64k 64k"];
    qcow2_image(p, &[], "a.qcow2", "2G", &writes);
    qcow2_image(p, &["-o", "cluster_size=512"], "b.qcow2", "2G", &writes);
    for img in ["a.qcow2", "b.qcow2"] {
        same(p, &["check", img]);
        same(p, &["check", "--output=json", img]);
    }
    assert!(same(p, &["check", "a.qcow2"]).contains("33.33% fragmented"));
    assert!(!same(p, &["check", "--output=json", "b.qcow2"]).contains("fragmented"));
}

/// A rebuild (here for a zero refcount) on an image whose file ends before data its L2
/// table maps: the new refcount structures go past those clusters, which are counted once
/// inside the file, so the guest never reads refcounts there and the image is clean.
/// (qemu-img puts the structures on those clusters.)
#[test]
fn check_repair_never_puts_refcounts_on_clusters_referenced_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "a.qcow2", &[(REFBLOCK + 2 * 5, 0, 2)], Some(0x60000));
    let before = cowbird_tests::qemu_raw(&p.join("a.qcow2"));
    let (code, _, err) = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &["check", "-r", "all", "a.qcow2"],
    );
    assert_eq!(code, 0, "{err}");
    cowbird_tests::assert_qemu_clean(&p.join("a.qcow2"));
    let after = cowbird_tests::qemu_raw(&p.join("a.qcow2"));
    cowbird_tests::assert_same(&after, &before, "guest data");
}

/// Refcounts with reserved bits in their table entry: qemu-img's rebuild fails there (it
/// would write over the old block); ours keeps clear of it and leaves a clean image.
#[test]
fn check_repair_rebuilds_around_a_refcount_block_with_a_bad_table_entry() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "a.qcow2", &[(REFTABLE, REFBLOCK | 0x100, 8)], None);
    std::fs::copy(p.join("a.qcow2"), p.join("orig.qcow2")).unwrap();
    let (code, _, err) = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &["check", "-r", "all", "a.qcow2"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Rebuilding refcount structure"), "{err}");
    assert_eq!(qemu(p, &["check", "a.qcow2"]).0, 0);
    assert_eq!(qemu(p, &["compare", "a.qcow2", "orig.qcow2"]).0, 0);
}

/// Bad command lines (unknown subcommands and options, missing option values, missing or
/// extra file names) get qemu-img's getopt and per-subcommand messages and exit code 1.
#[test]
fn command_line_errors_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["foo"],
        &["help"],
        &["--bogus"],
        &["-x"],
        &["info"],
        &["info", "a", "b"],
        &["info", "--bogus", "a"],
        &["info", "--bogus=3", "a"],
        &["info", "-x", "a"],
        &["info", "-Uq", "a"],
        &["info", "-f"],
        &["info", "--output"],
        &["info", "--out=json"],
        &["check", "-r", "bad", "a"],
        &["create", "-f", "qcow2"],
        &["create", "-f", "qcow2", "a", "1M", "extra"],
        &["compare", "a"],
        &["convert", "a"],
        &["convert", "-O"],
        &["resize", "a"],
        &["measure"],
        &["measure", "a", "b"],
        &["map"],
        &["rebase"],
        &["commit"],
        &["bench", "a", "b"],
        &["dd"],
        // An option's value may start with '-'.
        &["create", "-f", "-x", "x", "1M"],
        &["info", "-f", "-x", "a"],
        &["commit", "-r", "-1", "a"],
        &["map", "--start-offset", "-1", "a"],
        &["bench", "-c", "-1", "a"],
        &["measure", "--size", "-1"],
        &["convert", "-m", "-1", "a", "b"],
    ];
    for args in cases {
        let (code, _, err) = run_with_stderr(d.path(), env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(code, 1, "{args:?}: {err}");
        same(d.path(), args);
    }
}

/// Host devices (a loop device, /dev/null) are QEMU's `host_device` nodes, with their size
/// (a block device's `st_size` is 0).
#[test]
fn host_devices_are_read_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu(p, &["create", "-q", "-f", "raw", "disk.raw", "4M"]);
    let f = std::fs::File::options()
        .write(true)
        .open(p.join("disk.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7; 65536], 1 << 20).unwrap();
    let device = cowbird_tests::loop_device::LoopDevice::attach(&p.join("disk.raw"));
    let dev = device.path().to_str().unwrap();
    for args in [
        &["info", dev][..],
        &["info", "--output=json", dev],
        &["info", "/dev/null"],
        &["map", "--output=json", dev],
        &["measure", "-O", "qcow2", dev],
        &["compare", dev, "disk.raw"],
    ] {
        same(p, args);
    }
    assert!(same(p, &["info", dev]).contains("virtual size: 4 MiB"));
}

/// An empty file name, wherever an image is named, gets QEMU's file driver's refusal.
#[test]
fn empty_file_names_are_refused_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    let cases: &[&[&str]] = &[
        &["info", ""],
        &["info", "-f", "qcow2", ""],
        &["check", ""],
        &["map", ""],
        &["measure", "-O", "qcow2", ""],
        &["compare", "", "a.qcow2"],
        &["convert", "-O", "raw", "", "x"],
        &["convert", "-O", "raw", "a.qcow2", ""],
        &["dd", "if=", "of=x"],
        &["dd", "if=a.qcow2", "of="],
        &["resize", "", "1M"],
        &["commit", ""],
        &["amend", "-o", "lazy_refcounts=on", ""],
        &["snapshot", "-l", ""],
        &["bench", ""],
        &["create", "-f", "qcow2", "-b", "", "x", "1M"],
        &["create", "-f", "qcow2", "-o", "backing_file=", "x", "1M"],
    ];
    for args in cases {
        same(p, args);
    }
    assert!(!p.join("x").exists());
}

/// Every subcommand has its `--help` (exit 0, as qemu-img's); the top-level help ends as
/// qemu-img's does, with the formats it supports, for scripts that look for one there.
#[test]
fn help_for_every_subcommand_and_the_supported_formats() {
    let d = tempfile::tempdir().unwrap();
    let subcommands = [
        "amend", "bench", "check", "commit", "compare", "convert", "create", "dd", "info", "map",
        "measure", "rebase", "resize", "snapshot",
    ];
    for sub in subcommands {
        let (code, out) = qimg(d.path(), &[sub, "--help"]);
        assert_eq!((code, qemu(d.path(), &[sub, "--help"]).0), (0, 0), "{sub}");
        assert!(out.contains("Usage: qimg"), "{sub}: {out}");
    }
    let (code, out) = qimg(d.path(), &["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.ends_with("Supported image formats:\n\n  qcow2 raw\n"),
        "{out}"
    );
    for sub in subcommands {
        assert!(
            out.contains(&format!("  {sub} ")),
            "{sub} missing from:\n{out}"
        );
    }
    let (_, theirs) = qemu(d.path(), &["--help"]);
    let formats = theirs.split("Supported image formats:").nth(1).unwrap();
    for f in ["qcow2", "raw"] {
        assert!(formats.split_whitespace().any(|w| w == f), "{f}");
    }
}

/// qimg names itself in its errors as it was called, as qemu-img does: a `qemu-img` link to
/// qimg (a drop-in for scripts) prints exactly what qemu-img prints, byte for byte.
#[test]
fn a_qemu_img_link_to_qimg_prints_qemu_img_errors() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qimg"), &link).unwrap();
    let cases: &[&[&str]] = &[
        &["foo"],
        &["info", "--bogus", "a"],
        &["info", "-f"],
        &["create", "-f", "qcow2"],
        &["info", "missing.qcow2"],
        // Messages that name the program, or its subcommand's help.
        &["convert", "-l", "snapshot.foo=1", "missing.qcow2", "x"],
        &["measure", "-O", "qcow2", "--size", "1G", "-o", "foo=1"],
        &["info", "--output=xml", "missing.qcow2"],
        &["check", "-r", "bad", "missing.qcow2"],
        &["amend", "missing.qcow2"],
        &["snapshot", "-l", "-c", "x", "missing.qcow2"],
        &["snapshot", "a", "b"],
        &["create", "-o", "help", "-f", "qcow2"],
    ];
    for args in cases {
        let run = |tool: &Path| {
            let out = Command::new(tool)
                .current_dir(d.path())
                .args(*args)
                .output()
                .unwrap();
            (out.status.code(), out.stderr)
        };
        let (code, err) = run(&link);
        let (qemu_code, qemu_err) = run(Path::new("qemu-img"));
        assert_eq!(
            (code, String::from_utf8_lossy(&err)),
            (qemu_code, String::from_utf8_lossy(&qemu_err)),
            "{args:?}"
        );
    }
}

/// A reader that goes away early (`qimg map | head -1`) ends qimg quietly with status 0, as
/// qemu-img (which ignores SIGPIPE and print errors); it panicked on the closed stdout.
#[test]
fn a_closed_stdout_is_not_an_error() {
    use std::io::{BufRead, BufReader};
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("holes.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8192 * 20_000).unwrap();
    for i in 0..20_000u64 {
        std::os::unix::fs::FileExt::write_at(&f, &[1u8; 4096], i * 8192).unwrap();
    }
    for tool in [env!("CARGO_BIN_EXE_qimg"), "qemu-img"] {
        let mut child = Command::new(tool)
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&raw)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with("[{"), "{tool}: {first}");
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), err.as_ref()), (Some(0), ""), "{tool}");
    }
}

/// Corruption found while reading (an unaligned L2 entry) is reported in QEMU's words: the
/// qcow2 driver's "Image is corrupt: ..." line, then the command's error as an I/O error.
#[test]
fn corruption_found_while_reading_is_reported_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(p, "u.qcow2", &[(L2, (1 << 63) | 0x50200, 8)], None);
    for args in [
        &["convert", "-O", "raw", "u.qcow2", "out.raw"][..],
        &["map", "u.qcow2"],
        &["map", "--output=json", "u.qcow2"],
        &["dd", "if=u.qcow2", "of=dd.raw", "bs=64k"],
        &["info", "u.qcow2"],
    ] {
        same(p, args);
    }
}

/// A broken L2 entry inside a run of data ends the run before it, as in QEMU: only a query
/// that starts at the entry fails. `measure` (which skips to the end of its own clusters
/// after each run) succeeds or fails as qemu-img does, wherever the entry is.
#[test]
fn a_broken_entry_ends_a_run_before_it_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // 4 KiB clusters: the L2 table is the cluster after header, refcounts and L1.
    const L2_4K: u64 = 0x4000;
    for index in [1u64, 31, 32, 33, 40, 255, 256] {
        let name = format!("broken{index}.qcow2");
        let opts = ["-o", "cluster_size=4k"];
        qcow2_image(p, &opts, &name, "4M", &["write -P 1 0 1M"]);
        patch(p, &name, L2_4K + 8 * index, &0x200u64.to_be_bytes());
        for args in [
            &["measure", "-O", "qcow2", &name][..],
            &["measure", "-O", "qcow2", "-o", "cluster_size=4k", &name],
            &["map", "--output=json", &name],
        ] {
            same(p, args);
        }
    }
    // With extended L2 entries, a run that reaches an invalid bitmap fails: QEMU counts a
    // run through its entries' bitmaps.
    let xl2 = ["-o", "extended_l2=on"];
    qcow2_image(p, &xl2, "bitmap.qcow2", "4M", &["write -P 1 0 128k"]);
    patch(p, "bitmap.qcow2", L2 + 16 + 8, &[0xff; 8]);
    // Broken two ways: a zero flag in a v2 image and an unaligned offset; QEMU meets the
    // zero flag first.
    qcow2_image(
        p,
        &["-o", "compat=0.10"],
        "v2.qcow2",
        "4M",
        &["write -P 1 0 64k"],
    );
    let entry = header_u64(&p.join("v2.qcow2"), L2);
    patch(p, "v2.qcow2", L2, &(entry | 0x201).to_be_bytes());
    for args in [
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "bitmap.qcow2",
        ][..],
        &["measure", "-O", "qcow2", "bitmap.qcow2"],
        &["map", "--output=json", "bitmap.qcow2"],
        &["map", "--output=json", "v2.qcow2"],
        &["convert", "-O", "raw", "v2.qcow2", "v2.raw"],
    ] {
        same(p, args);
    }
}

/// Corruption found in an image opened for writing is fatal, as in QEMU: the qcow2
/// driver's "Marking image as corrupt: ..." line, the command's error as an I/O error, and
/// the image's corrupt bit set, so that nothing writes through the bad entry again until it
/// is repaired.
#[test]
fn corruption_found_in_an_image_open_for_writing_marks_it_corrupt_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // A data cluster and a preallocated zero cluster at unaligned host offsets.
    damaged(p, "u.qcow2", &[(L2, (1 << 63) | 0x50200, 8)], None);
    damaged(p, "z.qcow2", &[(L2, (1 << 63) | 0x50200 | 1, 8)], None);
    // A snapshot sharing an L2 table whose entry is then unaligned.
    layout_qcow2(p, "s.qcow2");
    assert_eq!(qemu(p, &["snapshot", "-c", "s0", "s.qcow2"]).0, 0);
    patch(p, "s.qcow2", L2, &0x50200u64.to_be_bytes());
    std::fs::write(p.join("src.raw"), vec![7u8; 1 << 20]).unwrap();
    // The same unaligned data cluster in an image over a backing file.
    qcow2_image(p, &[], "b.qcow2", "64M", &[]);
    qcow2_over(p, "b.qcow2", "ub.qcow2", "64M", &["write -P 1 0 256k"]);
    patch(p, "ub.qcow2", L2, &((1u64 << 63) | 0x50200).to_be_bytes());
    let cases: &[(&str, &[&str])] = &[
        ("ub.qcow2", &["rebase", "-b", "", "X"]),
        ("u.qcow2", &["bench", "-w", "-c", "1", "-s", "4k", "X"]),
        (
            "u.qcow2",
            &["bench", "-w", "-c", "1", "-s", "4k", "-o", "4k", "X"],
        ),
        ("u.qcow2", &["convert", "-n", "-O", "qcow2", "src.raw", "X"]),
        (
            "z.qcow2",
            &["bench", "-w", "-c", "1", "-s", "4k", "-o", "8k", "X"],
        ),
        ("u.qcow2", &["snapshot", "-c", "s1", "X"]),
        ("s.qcow2", &["snapshot", "-a", "s0", "X"]),
        ("s.qcow2", &["snapshot", "-d", "s0", "X"]),
    ];
    // qimg names the file in a write error; qemu-img does not.
    let normalised = |err: &str| err.replace("PROG: X: ", "PROG: ");
    for &(image, args) in cases {
        let outcomes: Vec<_> = run_on_copies(p, image, args, |copy| {
            let info = qemu(p, &["info", copy]).1;
            info.lines()
                .find(|l| l.contains("corrupt:"))
                .map(str::to_owned)
        })
        .into_iter()
        .map(|(code, out, err, corrupt)| (code, out, normalised(&err), corrupt))
        .collect();
        assert_eq!(outcomes[0], outcomes[1], "qimg vs qemu-img: {args:?}");
        assert!(
            outcomes[0].2.contains("Marking image as corrupt"),
            "{args:?}"
        );
        assert_eq!(
            outcomes[0].3.as_deref().map(str::trim),
            Some("corrupt: true"),
            "{args:?}"
        );
    }
    // Unaligned tables (an L2 table, a refcount block): the same line and corrupt bit when
    // open for writing; read-only, QEMU's "Image is corrupt" line and no bit. (After the
    // mark, qemu-img's failed write may say "No medium found": only the lines before are
    // compared.)
    damaged(p, "l1u.qcow2", &[(L1, (1 << 63) | (L2 + 0x200), 8)], None);
    damaged(p, "rbu.qcow2", &[(REFTABLE, REFBLOCK + 0x200, 8)], None);
    let tables: &[(&str, &[&str], &str)] = &[
        (
            "l1u.qcow2",
            &["convert", "-n", "-O", "qcow2", "src.raw", "X"],
            "qcow2: Marking image as corrupt: L2 table offset 0x40200 unaligned (L1 index: 0)",
        ),
        (
            "l1u.qcow2",
            &["convert", "-O", "raw", "X", "out.raw"],
            "qcow2: Image is corrupt: L2 table offset 0x40200 unaligned (L1 index: 0)",
        ),
        (
            "rbu.qcow2",
            &["convert", "-n", "-O", "qcow2", "src.raw", "X"],
            "qcow2: Marking image as corrupt: Refblock offset 0x20200 unaligned (reftable \
             index: 0)",
        ),
    ];
    // An L2 table past the end of the file is no such event: qemu-img reads zeros there,
    // qimg refuses the write, neither marks the image.
    damaged(p, "l1eof.qcow2", &[(L1, (1 << 63) | 0x900000, 8)], None);
    let args = ["convert", "-n", "-O", "qcow2", "src.raw", "X"];
    for (_, _, err, corrupt) in run_on_copies(p, "l1eof.qcow2", &args, |copy| {
        qemu(p, &["info", copy]).1.contains("corrupt: true")
    }) {
        assert!(!corrupt, "{err}");
    }
    // The same unaligned L2 table in the backing file of the image written: the backing
    // file's corruption, reported as such; the image written is not marked.
    let (code, out) = qemu(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "l1u.qcow2",
            "-F",
            "qcow2",
            "ovu.qcow2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let tables = [
        tables,
        &[(
            "ovu.qcow2",
            &["bench", "-w", "-c", "1", "-s", "4k", "X"][..],
            "qcow2: Image is corrupt: L2 table offset 0x40200 unaligned (L1 index: 0)",
        )],
    ]
    .concat();
    for &(image, args, line) in &tables {
        let outcomes: Vec<_> = run_on_copies(p, image, args, |copy| {
            qemu(p, &["info", copy]).1.contains("corrupt: true")
        })
        .into_iter()
        .map(|(code, _, err, corrupt)| {
            let first = err.lines().next().unwrap_or_default().to_owned();
            (code, first, corrupt)
        })
        .collect();
        assert_eq!(outcomes[0], outcomes[1], "qimg vs qemu-img: {args:?}");
        assert_eq!(outcomes[0].0, 1, "{args:?}");
        assert!(
            outcomes[0].1.starts_with(line),
            "{args:?}: {}",
            outcomes[0].1
        );
        assert_eq!(outcomes[0].2, line.contains("Marking"), "{args:?}");
    }
}

/// Two L2 entries sharing a cluster whose refcount is 1 (without COPIED): rewriting both
/// frees the cluster twice. qemu-img's second free fails, it says so on stderr
/// ("qcow2_free_clusters failed: Invalid argument") and the write goes on; so does qimg's.
#[test]
fn a_cluster_freed_twice_does_not_fail_the_write_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    damaged(
        p,
        "shared.qcow2",
        &[(L2, 0x50000, 8), (L2 + 8, 0x50000, 8)],
        None,
    );
    std::fs::write(p.join("src.raw"), vec![7u8; 1 << 20]).unwrap();
    let args = ["convert", "-n", "-O", "qcow2", "src.raw", "X"];
    let outcomes = run_on_copies(p, "shared.qcow2", &args, |_| ());
    for (code, _, err, ()) in &outcomes {
        assert_eq!(*code, 0, "{err}");
    }
    assert!(outcomes[1]
        .2
        .contains("qcow2_free_clusters failed: Invalid argument"));
    assert_eq!(outcomes[0].2, outcomes[1].2);
    let (code, out) = qemu(
        p,
        &["compare", "qimg-shared.qcow2", "qemu-img-shared.qcow2"],
    );
    assert_eq!(code, 0, "{out}");
}

/// `qemu-img check IMG` finds nothing wrong: no errors, no leaks.
fn assert_check_clean(dir: &Path, img: &str) {
    let (code, out) = qemu(dir, &["check", img]);
    assert_eq!(code, 0, "qemu-img check {img}: {out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
}

/// The guest contents of `img` (or of its internal snapshot `snap`), as qemu-img reads them.
fn qemu_contents(dir: &Path, img: &str, snap: Option<&str>) -> Vec<u8> {
    let out = dir.join("contents.raw");
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(s) = snap {
        args.extend(["-l", s]);
    }
    args.extend([img, "contents.raw"]);
    let (code, _) = qemu(dir, &args);
    assert_eq!(code, 0, "qemu-img {args:?}");
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    bytes
}

/// Writes `byte` over `len` bytes at `offset` of `img` through our engine.
fn engine_write(dir: &Path, img: &str, offset: u64, len: usize, byte: u8) {
    let opts = qcow2::OpenOptions::default();
    let image = qcow2::open_image(&dir.join(img), &opts).unwrap();
    image.write_at(&vec![byte; len], offset).unwrap();
    image.close().unwrap();
}

/// How many host clusters of qcow2 image `img` (in `dir`) have a nonzero refcount.
fn host_clusters_in_use(dir: &Path, img: &str) -> usize {
    cowbird_tests::host_clusters_in_use(&dir.join(img))
}

/// A 64M qcow2 with data, a compressed cluster and a preallocated zero cluster.
fn snapshot_base(p: &Path, name: &str, opts: &[&str]) {
    qcow2_image(
        p,
        opts,
        name,
        "64M",
        &[
            "write -P 1 0 1M",
            "write -c -P 7 4M 64k",
            "write -P 8 8M 64k",
            "write -z 8M 64k",
            "write -P 9 40M 2M",
        ],
    );
}

#[test]
fn snapshots_made_by_either_tool_are_read_listed_applied_and_deleted_by_the_other() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    snapshot_base(p, "a.qcow2", &[]);
    // qemu-img's snapshot, our list.
    qemu(p, &["snapshot", "-c", "q1", "a.qcow2"]);
    let listed = same(p, &["snapshot", "-l", "a.qcow2"]);
    assert!(
        listed.starts_with("Snapshot list:\n") && listed.contains(" q1 "),
        "{listed}"
    );
    assert_eq!(listed, same(p, &["snapshot", "a.qcow2"]));
    let q1 = qemu_contents(p, "a.qcow2", None);
    // Our engine writes after qemu-img's snapshot: copy-on-write of shared clusters.
    engine_write(p, "a.qcow2", 512 << 10, 1 << 20, 2);
    engine_write(p, "a.qcow2", 4 << 20, 4096, 3);
    assert_check_clean(p, "a.qcow2");
    assert!(qemu_contents(p, "a.qcow2", Some("q1")) == q1);
    // Our snapshot, qemu-img's list; qemu-io writes after it.
    let o1 = qemu_contents(p, "a.qcow2", None);
    assert_eq!(
        qimg(p, &["snapshot", "-c", "o1", "a.qcow2"]),
        (0, String::new())
    );
    assert_check_clean(p, "a.qcow2");
    let listed = same(p, &["snapshot", "-l", "a.qcow2"]);
    assert!(
        listed.contains(" q1 ") && listed.contains("\n2       o1 "),
        "{listed}"
    );
    qemu_io(
        p,
        "a.qcow2",
        &[
            "write -P 4 0 256k",
            "write -P 5 20M 1M",
            "write -z 40M 1M",
            "discard 8M 64k",
        ],
    );
    assert_check_clean(p, "a.qcow2");
    assert!(qemu_contents(p, "a.qcow2", Some("o1")) == o1);
    assert!(qemu_contents(p, "a.qcow2", Some("q1")) == q1);
    // Ours applies qemu-img's snapshot, qemu-img applies ours.
    std::fs::copy(p.join("a.qcow2"), p.join("b.qcow2")).unwrap();
    assert_eq!(
        qimg(p, &["snapshot", "-a", "q1", "a.qcow2"]),
        (0, String::new())
    );
    assert_check_clean(p, "a.qcow2");
    assert!(qemu_contents(p, "a.qcow2", None) == q1);
    assert_eq!(qemu(p, &["snapshot", "-a", "1", "b.qcow2"]).0, 0);
    assert_eq!(qemu(p, &["compare", "a.qcow2", "b.qcow2"]).0, 0);
    // The applied state changes on its own; the snapshots keep theirs.
    engine_write(p, "a.qcow2", 0, 64 << 10, 6);
    qemu_io(p, "a.qcow2", &["write -P 7 41M 64k"]);
    assert_check_clean(p, "a.qcow2");
    assert!(qemu_contents(p, "a.qcow2", Some("q1")) == q1);
    assert_eq!(
        qimg(p, &["snapshot", "-a", "2", "a.qcow2"]),
        (0, String::new())
    );
    assert!(qemu_contents(p, "a.qcow2", None) == o1);
    // Deleting: qemu-img deletes ours, we delete qemu-img's; what is left still reads.
    qimg(p, &["snapshot", "-c", "o2", "a.qcow2"]);
    qemu_io(p, "a.qcow2", &["write -P 8 0 2M"]);
    assert_eq!(qemu(p, &["snapshot", "-d", "o1", "a.qcow2"]).0, 0);
    assert_check_clean(p, "a.qcow2");
    assert_eq!(
        qimg(p, &["snapshot", "-d", "q1", "a.qcow2"]),
        (0, String::new())
    );
    assert_check_clean(p, "a.qcow2");
    same(p, &["snapshot", "-l", "a.qcow2"]);
    assert!(qemu_contents(p, "a.qcow2", Some("o2")) == o1);
    // What only the last snapshot held is freed (no leak either: the check is clean).
    let used = |img: &str| host_clusters_in_use(p, img);
    let before = used("a.qcow2");
    std::fs::copy(p.join("a.qcow2"), p.join("b.qcow2")).unwrap();
    assert_eq!(
        qimg(p, &["snapshot", "-d", "o2", "a.qcow2"]),
        (0, String::new())
    );
    assert_check_clean(p, "a.qcow2");
    assert_eq!(same(p, &["snapshot", "-l", "a.qcow2"]), "");
    // o2 alone held 1.5M of data (overwritten by qemu-io), an L2 table, its L1 table and
    // the snapshot table: qemu-img frees as many.
    assert_eq!(qemu(p, &["snapshot", "-d", "o2", "b.qcow2"]).0, 0);
    assert_eq!(before - used("a.qcow2"), 24 + 3);
    assert_eq!(used("a.qcow2"), used("b.qcow2"));
}

#[test]
fn snapshot_ids_duplicates_and_lookups_follow_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    snapshot_base(p, "a.qcow2", &[]);
    // Names "2", "x", "x", "1": IDs 1..4; -a looks up IDs first, -d names only.
    for (i, name) in ["2", "x", "x", "1"].iter().enumerate() {
        let tool = if i % 2 == 0 {
            "qemu-img"
        } else {
            env!("CARGO_BIN_EXE_qimg")
        };
        assert_eq!(run(p, tool, &["snapshot", "-c", name, "a.qcow2"]).0, 0);
        qemu_io(p, "a.qcow2", &[&format!("write -P {} 0 64k", 10 + i)]);
    }
    same(p, &["snapshot", "-l", "a.qcow2"]);
    for args in [
        &["snapshot", "-a", "2", "X"][..],
        &["snapshot", "-a", "x", "X"],
        &["snapshot", "-d", "2", "X"],
        &["snapshot", "-d", "x", "X"],
        &["snapshot", "-d", "4", "X"],
        &["snapshot", "-c", "x", "X"],
    ] {
        let (ours, theirs) = same_on_copies(p, "a.qcow2", args);
        assert_check_clean(p, &ours);
        // A snapshot made now may get another second in each copy.
        let list = |img: &str| sans_dates(&qemu(p, &["snapshot", "-l", img]).1);
        assert_eq!(list(&ours), list(&theirs), "{args:?}");
        assert_eq!(qemu(p, &["compare", &ours, &theirs]).0, 0, "{args:?}");
    }
    // qemu-img keeps 255 bytes of a name, so the whole one is not found afterwards.
    let long = "n".repeat(300);
    let (ours, theirs) = same_on_copies(p, "a.qcow2", &["snapshot", "-c", &long, "X"]);
    let names = |img: &str| {
        let info = qemu(p, &["info", "--output=json", img]).1;
        info.lines()
            .filter(|l| l.contains("\"name\""))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ours), names(&theirs));
    assert!(names(&ours)
        .iter()
        .any(|n| n.contains(&"n".repeat(255)) && !n.contains(&long)));
    let delete = |tool: &str, prog: &str, img: &str| {
        run_with_stderr(p, tool, prog, &["snapshot", "-d", &long, img])
    };
    let mine = delete(env!("CARGO_BIN_EXE_qimg"), "qimg", &ours);
    assert_eq!(mine, delete("qemu-img", "qemu-img", &theirs));
    assert_eq!(mine.0, 1);
}

/// A snapshot list with the DATE column blanked (names up to 16 characters).
fn sans_dates(list: &str) -> String {
    list.lines()
        .map(|l| match l.get(34..53) {
            Some(date) if date.as_bytes()[4] == b'-' => format!("{}{}", &l[..34], &l[53..]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn snapshot_refuses_what_qemu_img_refuses_with_its_words() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    snapshot_base(p, "a.qcow2", &[]);
    qemu(p, &["snapshot", "-c", "s", "a.qcow2"]);
    qcow2_image(p, &["-o", "data_file=d.raw"], "df.qcow2", "1M", &[]);
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    qcow2_image(p, &[], "gone.qcow2", "1M", &[]);
    qcow2_over(p, "gone.qcow2", "orphan.qcow2", "1M", &[]);
    std::fs::remove_file(p.join("gone.qcow2")).unwrap();
    for args in [
        &["snapshot", "-l", "orphan.qcow2"][..],
        &["snapshot", "-c", "x", "orphan.qcow2"],
        &["snapshot", "-c", "x", "df.qcow2"],
        &["snapshot", "-a", "x", "df.qcow2"],
        &["snapshot", "-d", "x", "df.qcow2"],
        &["snapshot", "-l", "df.qcow2"],
        &["snapshot", "-f", "raw", "-c", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-a", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-d", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-l", "r.raw"],
        &["snapshot", "-a", "nope", "a.qcow2"],
        &["snapshot", "-d", "nope", "a.qcow2"],
        &["snapshot", "-d", "1", "a.qcow2"],
        &["snapshot", "-U", "-c", "x", "a.qcow2"],
        &["snapshot", "-U", "-l", "a.qcow2"],
        &["snapshot", "-l", "-l", "a.qcow2"],
        &["snapshot", "-c", "x", "-d", "y", "a.qcow2"],
        &["snapshot", "-a", "x", "-a", "x", "a.qcow2"],
        &["snapshot", "a.qcow2", "b"],
        &["snapshot", "-l"],
        &["snapshot", "-l", "missing.qcow2"],
        &["snapshot", "-c", "x", "missing.qcow2"],
    ] {
        let before = std::fs::read(p.join("a.qcow2")).unwrap();
        same(p, args);
        assert!(
            std::fs::read(p.join("a.qcow2")).unwrap() == before,
            "{args:?}"
        );
    }
    // An image in use: the lock keeps both tools out.
    let mut holder = Command::new("qemu-io")
        .current_dir(p)
        .args(["-f", "qcow2", "a.qcow2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    same(p, &["snapshot", "-c", "x", "a.qcow2"]);
    same(p, &["snapshot", "-l", "a.qcow2"]);
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn snapshot_sequences_on_copies_end_like_qemu_img_on_every_kind_of_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "64M", &["write -P 11 0 4M"]);
    let kinds: [(&str, &[&str]); 9] = [
        ("v3.qcow2", &[]),
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("lazy.qcow2", &["-o", "lazy_refcounts=on"]),
        ("small.qcow2", &["-o", "cluster_size=512,refcount_bits=8"]),
        ("wide.qcow2", &["-o", "refcount_bits=64"]),
        ("top.qcow2", &["-b", "base.qcow2", "-F", "qcow2"]),
        ("xl2.qcow2", &["-o", "extended_l2=on"]),
        ("xl2small.qcow2", &["-o", "extended_l2=on,cluster_size=16k"]),
        (
            "xl2top.qcow2",
            &["-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2"],
        ),
    ];
    for (img, opts) in kinds {
        let v2 = img.starts_with("v2");
        snapshot_base(p, img, opts);
        let (ours, theirs) = same_on_copies(p, img, &["snapshot", "-c", "s", "X"]);
        let both = [ours.as_str(), theirs.as_str()];
        let at_s = qemu_contents(p, &ours, None);
        // Whole clusters, and pieces of clusters and subclusters shared with "s".
        let mut writes = vec![
            "write -P 21 512k 1M",
            "write -z 4M 64k",
            "write -P 22 60M 64k",
            "write -P 24 4100 3000",
            "write -P 25 8200k 3k",
            "write -z 40966k 2k",
        ];
        if !v2 {
            writes.push("write -z -u 40M 1M");
        }
        for i in both {
            qemu_io(p, i, &writes);
            if !v2 {
                qemu(p, &["resize", "-q", i, "80M"]);
                qemu_io(p, i, &["write -P 23 70M 1M"]);
            }
        }
        assert_eq!(qimg(p, &["snapshot", "-c", "t", &ours]), (0, String::new()));
        assert_eq!(
            qemu(p, &["snapshot", "-c", "t", &theirs]),
            (0, String::new())
        );
        let at_t = qemu_contents(p, &ours, None);
        for (args, active) in [
            (["snapshot", "-a", "s"], &at_s),
            (["snapshot", "-a", "2"], &at_t),
            (["snapshot", "-d", "t"], &at_t),
            (["snapshot", "-d", "s"], &at_t),
        ] {
            let [o, t] = [&ours, &theirs].map(|i| [&args[..], &[i.as_str()]].concat());
            let mine = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &o);
            let reference = run_with_stderr(p, "qemu-img", "qemu-img", &t);
            assert_eq!(mine, reference, "{img}: {args:?}");
            for i in both {
                assert_check_clean(p, i);
            }
            assert!(qemu_contents(p, &ours, None) == *active, "{img}: {args:?}");
            assert_eq!(
                qemu(p, &["compare", &ours, &theirs]).0,
                0,
                "{img}: {args:?}"
            );
            assert_eq!(
                sans_dates(&qemu(p, &["snapshot", "-l", &ours]).1),
                sans_dates(&qemu(p, &["snapshot", "-l", &theirs]).1),
                "{img}: {args:?}"
            );
            assert_eq!(
                sans_dates(&info_sans_sizes(p, &ours, &ours)),
                sans_dates(&info_sans_sizes(p, &theirs, &theirs)),
                "{img}: {args:?}"
            );
        }
        assert_eq!(
            host_clusters_in_use(p, &ours),
            host_clusters_in_use(p, &theirs),
            "{img}"
        );
    }
}

#[test]
fn a_snapshot_that_overflows_a_refcount_fails_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &["-o", "refcount_bits=1"],
        "r.qcow2",
        "1M",
        &["write 0 64k"],
    );
    let (ours, theirs) = same_on_copies(p, "r.qcow2", &["snapshot", "-c", "x", "X"]);
    let o = run_with_stderr(p, "qemu-img", "qemu-img", &["check", &ours]);
    let t = run_with_stderr(p, "qemu-img", "qemu-img", &["check", &theirs]);
    assert_eq!(o, t);
    assert_eq!(o.0, 3, "one leaked cluster: {o:?}");
    same(p, &["snapshot", "-c", "x", "r.qcow2"]);
}

/// `qemu-img info` of `img` without sizes, file names and the file length.
fn info_sans_layout(dir: &Path, img: &str) -> String {
    qemu(dir, &["info", img])
        .1
        .lines()
        .filter(|l| {
            !["disk size", "file length", "image:", "filename:"]
                .iter()
                .any(|s| l.contains(s))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `amend -o OPTS` on copies of `img` by both tools: same exit code, stdout and
/// stderr; ours is check-clean, and both read the same (disk and every snapshot) and show
/// the same info. Returns the exit code.
fn amend_both(dir: &Path, img: &str, opts: &str) -> i32 {
    let [ours, theirs] = ["ours", "theirs"].map(|w| format!("{w}-{img}"));
    std::fs::copy(dir.join(img), dir.join(&ours)).unwrap();
    std::fs::copy(dir.join(img), dir.join(&theirs)).unwrap();
    let mine = run_with_stderr(
        dir,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &["amend", "-o", opts, &ours],
    );
    let reference = run_with_stderr(dir, "qemu-img", "qemu-img", &["amend", "-o", opts, &theirs]);
    assert_eq!(mine, reference, "amend -o {opts} on {img}");
    assert_check_clean(dir, &ours);
    assert_eq!(
        qemu(dir, &["compare", &ours, &theirs]).0,
        0,
        "{opts} on {img}"
    );
    assert_eq!(
        info_sans_layout(dir, &ours),
        info_sans_layout(dir, &theirs),
        "{opts} on {img}"
    );
    let listed = qemu(dir, &["snapshot", "-l", &theirs]).1;
    for name in listed
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
    {
        assert!(
            qemu_contents(dir, &ours, Some(name)) == qemu_contents(dir, &theirs, Some(name)),
            "snapshot {name} after {opts} on {img}"
        );
    }
    mine.0
}

#[test]
fn amend_changes_every_option_as_qemu_img_does() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // v3 with a snapshot, zero clusters (plain and preallocated, some shared with the
    // snapshot) and a compressed cluster.
    snapshot_base(p, "a.qcow2", &[]);
    qemu(p, &["snapshot", "-c", "s", "a.qcow2"]);
    qemu_io(
        p,
        "a.qcow2",
        &["write -z 1M 64k", "write -P 7 0 64k", "write -z -u 40M 64k"],
    );
    qcow2_image(
        p,
        &["-o", "compat=0.10"],
        "v2.qcow2",
        "64M",
        &["write -P 1 0 1M"],
    );
    qemu(p, &["snapshot", "-c", "s", "v2.qcow2"]);
    qcow2_image(p, &[], "base.qcow2", "64M", &["write -P 9 0 8M"]);
    qcow2_over(
        p,
        "base.qcow2",
        "top.qcow2",
        "64M",
        &[
            "write -z 0 64k",
            "write -z 1M 1M",
            "write -P 3 2M 64k",
            "write -z 2M 64k",
        ],
    );
    qemu(p, &["snapshot", "-c", "s", "top.qcow2"]);
    qemu_io(p, "top.qcow2", &["write -z 3M 64k"]);
    qcow2_image(
        p,
        &["-o", "cluster_size=512"],
        "small.qcow2",
        "64M",
        &["write -P 1 0 3M", "write -P 2 60M 1M"],
    );
    qemu(p, &["snapshot", "-c", "s", "small.qcow2"]);
    qcow2_image(
        p,
        &["-o", "data_file=a.raw,data_file_raw=on"],
        "df.qcow2",
        "1M",
        &[],
    );
    let options = [
        "compat=1.1",
        "compat=0.10",
        "compat=v3",
        "compat=0.10,compat=1.1",
        "lazy_refcounts=on",
        "lazy_refcounts=off",
        "compat=0.10,lazy_refcounts=on",
        "compat=1.1,lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=8",
        "refcount_bits=64",
        "compat=0.10,refcount_bits=8",
        "compat=1.1,refcount_bits=32",
        "size=32M",
        "size=128M",
        "size=128M,compat=0.10",
        "size=1000",
        "backing_file=b.qcow2",
        "backing_fmt=raw",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "data_file=x",
        "data_file_raw=on",
        "data_file_raw=off",
    ];
    let mut changed = 0;
    for img in ["a.qcow2", "v2.qcow2", "top.qcow2", "small.qcow2"] {
        for o in options {
            changed += usize::from(amend_both(p, img, o) == 0);
        }
    }
    std::fs::copy(p.join("a.raw"), p.join("b.raw")).unwrap();
    for o in [
        "data_file=b.raw",
        "data_file_raw=off",
        "data_file_raw=on",
        "compat=0.10",
    ] {
        amend_both(p, "df.qcow2", o);
    }
    assert!(changed > 40, "{changed} amends succeeded");
}

/// Bitmaps that a program without bitmap support left behind (a bitmaps extension without
/// its autoclear bit: a v3 image such a program wrote, or any v2 image, which has no
/// autoclear bits) are ignored, with QEMU's warning, by every command that opens the image;
/// a downgrade to v2 keeps the extension, as qemu-img's does.
#[test]
fn bitmaps_left_by_a_program_without_bitmap_support_are_warned_about_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "v3.qcow2", "4M", &["write -P 1 0 64k"]);
    qemu(p, &["bitmap", "--add", "v3.qcow2", "b"]);
    qemu_io(p, "v3.qcow2", &["write -P 2 1M 64k"]);
    for who in ["ours", "theirs"] {
        std::fs::copy(p.join("v3.qcow2"), p.join(format!("{who}-down.qcow2"))).unwrap();
    }
    let amend = |tool: &str, prog: &str, img: &str| {
        run_with_stderr(p, tool, prog, &["amend", "-o", "compat=0.10", img])
    };
    assert_eq!(
        amend(env!("CARGO_BIN_EXE_qimg"), "qimg", "ours-down.qcow2"),
        amend("qemu-img", "qemu-img", "theirs-down.qcow2")
    );
    // The autoclear bits are at byte 88 of a v3 header.
    patch(p, "v3.qcow2", 88, &0u64.to_be_bytes());
    qemu(p, &["convert", "-O", "raw", "v3.qcow2", "plain.raw"]);
    for (img, warning) in [
        (
            "v3.qcow2",
            "a program lacking bitmap support modified this file",
        ),
        ("ours-down.qcow2", "This qcow2 v2 image contains bitmaps"),
        ("theirs-down.qcow2", "This qcow2 v2 image contains bitmaps"),
    ] {
        let err = run_with_stderr(p, "qemu-img", "qemu-img", &["info", img]).2;
        assert!(err.contains(warning), "{img}: {err}");
        for args in [
            &["info", img][..],
            &["info", "--output=json", img],
            &["check", img],
            &["map", img],
            &["measure", "-O", "qcow2", img],
            &["compare", img, "plain.raw"],
        ] {
            same(p, args);
        }
    }
}

/// Downgrading an image whose preallocated zero cluster is shared with a snapshot that
/// maps it as data: the disk gets a cluster of zeros of its own and the snapshot keeps its
/// data (qemu-img 10 writes the zeros into the shared cluster).
#[test]
fn downgrade_keeps_a_snapshot_s_data_under_a_shared_zero_cluster() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "z.qcow2", "1M", &["write -P 0x33 0 64k"]);
    assert_eq!(qemu(p, &["snapshot", "-c", "s1", "z.qcow2"]).0, 0);
    // The zero flag over the host cluster the snapshot shares (refcount 2).
    qemu_io(p, "z.qcow2", &["write -z 0 64k"]);
    let s1 = qemu_contents(p, "z.qcow2", Some("s1"));
    assert_eq!(qimg(p, &["amend", "-o", "compat=0.10", "z.qcow2"]).0, 0);
    assert_check_clean(p, "z.qcow2");
    assert!(qemu_contents(p, "z.qcow2", Some("s1")) == s1, "snapshot s1");
    qemu_io(p, "z.qcow2", &["read -P 0 0 1M"]);
}

/// A zstd image whose compressed clusters are all in a snapshot cannot be downgraded
/// either (v2 would read them as deflate): qimg refuses as qemu-img does for compressed
/// clusters of the active disk, and leaves the image alone.
#[test]
fn downgrade_refuses_zstd_clusters_of_snapshots() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let zstd = ["-o", "compression_type=zstd"];
    qcow2_image(p, &zstd, "active.qcow2", "1M", &["write -c -P 0x11 0 64k"]);
    qcow2_image(p, &zstd, "snap.qcow2", "1M", &["write -c -P 0x11 0 64k"]);
    assert_eq!(qemu(p, &["snapshot", "-c", "s1", "snap.qcow2"]).0, 0);
    qemu_io(p, "snap.qcow2", &["write -P 0x22 0 64k"]);
    let before = std::fs::read(p.join("snap.qcow2")).unwrap();
    let amend = ["amend", "-o", "compat=0.10"];
    let theirs = run_with_stderr(
        p,
        "qemu-img",
        "qemu-img",
        &[&amend[..], &["active.qcow2"]].concat(),
    );
    let ours = run_with_stderr(
        p,
        env!("CARGO_BIN_EXE_qimg"),
        "qimg",
        &[&amend[..], &["snap.qcow2"]].concat(),
    );
    assert_ne!(theirs.0, 0);
    assert_eq!(ours, theirs);
    assert!(
        std::fs::read(p.join("snap.qcow2")).unwrap() == before,
        "image changed"
    );
}

/// v3 images with clusters of 4 KiB or less get no feature name table, as QEMU writes
/// them: a v2 image with 512-byte clusters and a backing file upgrades (the table left no
/// room for the backing file name in the header cluster), and new images with a backing
/// file get qemu-img's header cluster byte for byte.
#[test]
fn small_cluster_images_with_a_backing_file_upgrade_and_are_created_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(
        p,
        &["-o", "compat=0.10"],
        "old.qcow2",
        "1M",
        &["write -P 1 0 1M"],
    );
    let opts = [
        "-o",
        "compat=0.10,cluster_size=512",
        "-b",
        "old.qcow2",
        "-F",
        "qcow2",
    ];
    qcow2_image(p, &opts, "top.qcow2", "1M", &["write -P 2 0 64k"]);
    assert_eq!(amend_both(p, "top.qcow2", "compat=1.1"), 0);
    for cs in ["512", "4096", "65536"] {
        let o = format!("cluster_size={cs}");
        let opts = ["-o", &o, "-b", "old.qcow2", "-F", "qcow2"];
        let [ours, theirs] = ["ours", "theirs"].map(|w| format!("{w}-{cs}.qcow2"));
        qimg_qcow2(p, &opts, &ours, "1M", &[]);
        qcow2_image(p, &opts, &theirs, "1M", &[]);
        let header = |f: &str| std::fs::read(p.join(f)).unwrap()[..cs.parse().unwrap()].to_vec();
        assert!(
            header(&ours) == header(&theirs),
            "header cluster of {cs}-byte clusters"
        );
    }
}

#[test]
fn amend_refuses_and_helps_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "64M", &["write -P 1 0 1M"]);
    qemu(p, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for o in [
        "help",
        "?",
        "help,compat=1.1",
        "cluster_size=4096",
        "cluster_size=4096,foo=bar",
        "encryption=on",
        "encrypt.format=luks",
        "preallocation=full",
        "compression_type=zstd",
        "extended_l2=on",
        "nocow=on",
        "foo=bar",
        "compat=foo",
        "compat",
        "lazy_refcounts=foo",
        "size=foo",
        "refcount_bits=foo",
        "refcount_bits=3",
        "refcount_bits=128",
        "encrypt.new-secret=x",
        // QEMU's order: the refcount width changes before the backing file is refused.
        "backing_file=x,refcount_bits=8",
        "refcount_bits=8,size=2M,backing_file=x",
    ] {
        amend_both(p, "a.qcow2", o);
    }
    // A refcount width that cannot hold a snapshot's references fails before lazy refcounts
    // are set; in a v2 image, the width's error comes first.
    qcow2_image(p, &[], "s.qcow2", "64M", &["write -P 1 0 1M"]);
    assert_eq!(qemu(p, &["snapshot", "-c", "s1", "s.qcow2"]).0, 0);
    qcow2_image(p, &["-o", "compat=0.10"], "v2.qcow2", "64M", &[]);
    for img in ["s.qcow2", "v2.qcow2"] {
        assert_eq!(amend_both(p, img, "refcount_bits=1,lazy_refcounts=on"), 1);
    }
    for args in [
        &["amend", "a.qcow2"][..],
        &["amend", "-o", "help"],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["amend", "-f", "raw", "-o", "help"],
        &["amend", "-o", "compat=1.1"],
        &["amend", "-o", "compat=1.1", "a.qcow2", "b"],
        &["amend", "-f", "raw", "-o", "compat=1.1", "r.raw"],
        &["amend", "-f", "raw", "-o", "help", "r.raw"],
        &["amend", "-o", "compat=1.1", "missing.qcow2"],
        &["amend", "-t", "bogus", "-o", "compat=1.1", "a.qcow2"],
        &["amend", "-q", "-o", "compat=1.1", "a.qcow2"],
    ] {
        same(p, args);
    }
    // An image in use: the lock keeps both tools out.
    let mut holder = Command::new("qemu-io")
        .current_dir(p)
        .args(["-f", "qcow2", "a.qcow2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    same(p, &["amend", "-o", "compat=0.10", "a.qcow2"]);
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn preallocation_fills_its_own_clusters_and_never_hides_a_backing_file_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "20M", &["write -P 17 0 3M"]);
    qcow2_over(
        p,
        "base.qcow2",
        "top.qcow2",
        "24M",
        &["write -P 34 4M 1M", "write -P 51 21M 64k"],
    );
    // Preallocated clusters would hide the backing file (without subclusters), and
    // compressed clusters cannot be preallocated: refused before any file is made.
    let refused: [&[&str]; 4] = [
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "n.img",
            "20M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "n.img",
            "20M",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "n.img",
        ],
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "top.qcow2",
            "n.img",
        ],
    ];
    for args in refused {
        let (code, _, err) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(!p.join("n.img").exists(), "{args:?}");
        same(p, args);
    }
    // Conversions into a preallocated target (with extended L2 entries over a backing file
    // too): the data goes into the preallocated clusters, so both tools lay the image out
    // alike, with no cluster allocated twice.
    let cases: [&[&str]; 4] = [
        &["-o", "preallocation=metadata"],
        &["-o", "preallocation=falloc"],
        &["-o", "preallocation=full"],
        &[
            "-o",
            "preallocation=metadata,extended_l2=on",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
    ];
    for opts in cases {
        let mut layouts = Vec::new();
        for (tool, out) in [
            (env!("CARGO_BIN_EXE_qimg"), "ours.img"),
            ("qemu-img", "theirs.img"),
        ] {
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(opts);
            args.extend(["top.qcow2", out]);
            assert_eq!(run(p, tool, &args).0, 0, "{tool} {args:?}");
            assert_eq!(qemu(p, &["compare", "top.qcow2", out]).0, 0, "{opts:?}");
            assert_check_clean(p, out);
            let len = std::fs::metadata(p.join(out)).unwrap().len();
            layouts.push((len, qemu(p, &["map", "--output=json", out]).1));
        }
        assert_eq!(layouts[0], layouts[1], "{opts:?}");
    }
}

/// Disk blocks a file takes (`du`).
fn blocks_of(dir: &Path, f: &str) -> u64 {
    std::fs::metadata(dir.join(f)).unwrap().blocks()
}

/// `-o` follows QEMU's option syntax: `,,` is a comma in a value, an `-o` that cannot be
/// joined to others (empty, a leading comma, an odd number of trailing commas) is refused,
/// a bare `key` is `key=on` and `nokey` is `key=off`, names are taken as written (no `-`
/// for `_`), and `help` or `?` anywhere lists the options instead of creating anything.
#[test]
fn create_reads_option_lists_and_lists_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "b,c.qcow2", "1M", &[]);
    for args in [
        &["create", "-f", "qcow2", "-o", ",", "x.qcow2", "1M"][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            ",cluster_size=4k",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k,,",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k,,,",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,,,lazy_refcounts=on",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster-size=4k",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "nolazy_refcounts,id=1",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "nocow", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=x,compat=1.1",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=4M", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=new,,x.d",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=b,,c.qcow2,backing_fmt=qcow2",
            "x.qcow2",
        ],
        &["create", "-f", "qcow2", "x.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "b,c.qcow2",
            "-F",
            "foo",
            "x.qcow2",
        ],
        // The "Formatting" line shows values as given, -b over -o backing_file.
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=off,extended_l2=yes,lazy_refcounts=true,cluster_size=0x10000",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "b,c.qcow2",
            "-F",
            "qcow2",
            "-o",
            "backing_file=c",
            "x.qcow2",
        ],
        &["create", "-f", "foo", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "help", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "foo,?", "x.qcow2"],
        &["create", "-f", "qcow2", "-o", "help"],
        &["create", "-o", "help"],
        &["create", "-o", "cluster_size=4k", "-o", "help", "x.raw"],
        &["create", "-f", "foo", "-o", "help"],
    ] {
        same(p, args);
        if args.contains(&"data_file=new,,x.d") {
            assert!(p.join("new,x.d").exists());
        }
    }
    let info = qemu(p, &["info", "--output=json", "x.qcow2"]).1;
    assert!(
        info.contains("\"backing-filename\": \"b,c.qcow2\""),
        "{info}"
    );
}

/// Raw images take QEMU's file options: `preallocation` (off, falloc, full; metadata is
/// refused once the file exists), `nocow` and `extent_size_hint`, and nothing else.
#[test]
fn create_raw_takes_the_file_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for opts in [
        "preallocation=full",
        "preallocation=falloc",
        "preallocation=off",
        "preallocation=metadata",
        "preallocation=bad",
        "nocow=on,extent_size_hint=2M",
        "nocow=yes,preallocation=full,preallocation=off,extent_size_hint=0x10",
        "nocow=x",
        "extent_size_hint=5G",
        "extent_size_hint=-1",
        "foo=1",
        "compat=1.1",
        "size=2M",
    ] {
        let case = ["create", "-f", "raw", "-o", opts, "X", "1000k"];
        let (ours, theirs) = (format!("ours-{opts}"), format!("theirs-{opts}"));
        let (a1, a2) = (with_name(&case, &ours), with_name(&case, &theirs));
        let (a1, a2): (Vec<&str>, Vec<&str>) = (
            a1.iter().map(String::as_str).collect(),
            a2.iter().map(String::as_str).collect(),
        );
        let (c1, o1, e1) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", &a1);
        let (c2, o2, e2) = run_with_stderr(p, "qemu-img", "qemu-img", &a2);
        assert_eq!(
            (c1, o1.replace(&ours, "X"), e1.replace(&ours, "X")),
            (c2, o2.replace(&theirs, "X"), e2.replace(&theirs, "X")),
            "{opts}"
        );
        assert_eq!(p.join(&ours).exists(), p.join(&theirs).exists(), "{opts}");
        if p.join(&ours).exists() {
            assert_eq!(size_of(p, &ours), size_of(p, &theirs), "{opts}");
            assert_eq!(blocks_of(p, &ours), blocks_of(p, &theirs), "{opts}");
        }
    }
    for args in [
        &["create", "-f", "raw", "-b", "x", "r.raw", "1M"][..],
        &["create", "-f", "raw", "-F", "qcow2", "r.raw", "1M"],
        &["create", "-f", "raw", "-o", "size=1M", "r.raw", "1M"],
        &["create", "-f", "raw", "r.raw"],
    ] {
        same(p, args);
    }
}

/// convert reads its options as qemu-img does: values may start with `-`, `-m` and `-S` are
/// numbers and sizes in qemu-img's ranges, `-o help` lists the target format's options,
/// `-o` with `-n` is refused, and errors about the target use qemu-img's words.
#[test]
fn convert_reads_options_and_words_errors_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "top.qcow2", "1M", &["write -P 1 0 64k"]);
    qcow2_image(p, &[], "small.qcow2", "512k", &[]);
    qcow2_image(p, &[], "big.qcow2", "4M", &[]);
    std::fs::write(p.join("small.raw"), vec![0u8; 1000]).unwrap();
    for args in [
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "help",
            "top.qcow2",
            "o.qcow2",
        ][..],
        &["convert", "-O", "qcow2", "-o", "?", "top.qcow2", "o.qcow2"],
        &["convert", "-o", "help", "top.qcow2", "o.raw"],
        &["convert", "-o", "help", "top.qcow2"],
        &["convert", "-O", "qcow2", "-o", "help"],
        &["convert", "-O", "foo", "-o", "help", "top.qcow2", "o.raw"],
        &["convert", "-O", "qcow2", "-o", ",", "top.qcow2", "o.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster-size=4k",
            "top.qcow2",
            "o.qcow2",
        ],
        &["convert", "-O", "qcow2", "-o", "-x", "top.qcow2", "o.qcow2"],
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "big.qcow2",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-o",
            "help",
            "top.qcow2",
            "big.qcow2",
        ],
        &["convert", "top.qcow2"],
        &["convert", "-m", "0", "top.qcow2", "o.raw"],
        &["convert", "-m", "17", "top.qcow2", "o.raw"],
        &["convert", "-m", "x", "top.qcow2", "o.raw"],
        &["convert", "-m", "-1", "top.qcow2", "o.raw"],
        &["convert", "-m", "0x2", "-m", "3", "top.qcow2", "o.raw"],
        &["convert", "--parallel=1k", "top.qcow2", "o.raw"],
        &["convert", "-S", "-1", "top.qcow2", "o.raw"],
        &["convert", "-l", "-1", "top.qcow2", "o.raw"],
        &["convert", "-C", "-c", "-O", "qcow2", "top.qcow2", "o.qcow2"],
        &["convert", "-C", "-S", "0", "top.qcow2", "o.raw"],
        &["convert", "--skip-broken-bitmaps", "top.qcow2", "o.raw"],
        &["convert", "--target-image-opts", "top.qcow2", "o.raw"],
        &["convert", "-n", "top.qcow2", "nosuch.img"],
        &["convert", "-n", "-O", "foo", "top.qcow2", "big.qcow2"],
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "small.qcow2"],
        &["convert", "-n", "top.qcow2", "small.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "nosuch.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "./nosuch.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &["convert", "-O", "raw", "-F", "qcow2", "top.qcow2", "o.raw"],
    ] {
        same(p, args);
    }
    // -C copies data ranges whole: zeros written in them stay allocated, as with qemu-img.
    let mut data = vec![7u8; 1 << 20];
    data.resize(3 << 20, 0);
    std::fs::write(p.join("src.raw"), data).unwrap();
    for fmt in ["raw", "qcow2"] {
        let (ours, theirs) = (format!("ours.{fmt}"), format!("theirs.{fmt}"));
        assert_eq!(
            qimg(p, &["convert", "-C", "-O", fmt, "src.raw", &ours]).0,
            0
        );
        assert_eq!(
            qemu(p, &["convert", "-C", "-O", fmt, "src.raw", &theirs]).0,
            0
        );
        let map = |f: &str| qemu(p, &["map", "--output=json", f]).1.replace(f, "X");
        assert_eq!(map(&ours), map(&theirs), "{fmt}");
        assert_eq!(blocks_of(p, &ours), blocks_of(p, &theirs), "{fmt}");
    }
}

/// The file driver's options go with qcow2 images too, as qemu-img takes them: `nocow` and
/// `extent_size_hint` for create and convert, with the same output and refusals.
#[test]
fn qcow2_images_take_the_file_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "top.qcow2", "4M", &["write -P 1 1M 64k"]);
    for opts in [
        "nocow=on,extent_size_hint=2M",
        "nocow=off,extent_size_hint=0",
        "extent_size_hint=5G",
        "nocow=x",
    ] {
        for args in [
            &["create", "-f", "qcow2", "-o", opts, "X", "1M"][..],
            &["convert", "-O", "qcow2", "-o", opts, "top.qcow2", "X"],
        ] {
            let _ = std::fs::remove_file(p.join("x.qcow2"));
            same(
                p,
                &with_name(args, "x.qcow2")
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            );
            if opts.starts_with("nocow=o") {
                assert_eq!(qemu(p, &["check", "x.qcow2"]).0, 0, "{args:?}");
            }
        }
    }
}

/// A raw target takes the file driver's options as `create -f raw` does: a preallocated
/// target is as big on disk as qemu-img's, and what raw images do not take is refused.
#[test]
fn convert_to_raw_takes_the_file_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "top.qcow2", "4M", &["write -P 1 1M 64k"]);
    for opts in [
        "preallocation=full",
        "preallocation=falloc",
        "preallocation=off",
        "nocow=on,extent_size_hint=0",
        "size=1M",
    ] {
        let ours = same(
            p,
            &["convert", "-O", "raw", "-o", opts, "top.qcow2", "ours.raw"],
        );
        assert_eq!(ours, "");
        assert_eq!(
            qemu(
                p,
                &[
                    "convert",
                    "-O",
                    "raw",
                    "-o",
                    opts,
                    "top.qcow2",
                    "theirs.raw"
                ]
            )
            .0,
            0
        );
        assert_eq!(
            qimg(
                p,
                &["convert", "-O", "raw", "-o", opts, "top.qcow2", "ours.raw"]
            )
            .0,
            0
        );
        assert_eq!(size_of(p, "ours.raw"), size_of(p, "theirs.raw"), "{opts}");
        assert_eq!(
            blocks_of(p, "ours.raw"),
            blocks_of(p, "theirs.raw"),
            "{opts}"
        );
        assert_eq!(
            std::fs::read(p.join("ours.raw")).unwrap(),
            std::fs::read(p.join("theirs.raw")).unwrap()
        );
    }
    for opts in [
        "preallocation=metadata",
        "preallocation=bad",
        "foo=1",
        "compat=1.1",
        "backing_file=x",
        "extent_size_hint=5G",
        "help",
    ] {
        same(
            p,
            &["convert", "-O", "raw", "-o", opts, "top.qcow2", "o.raw"],
        );
    }
}

/// `convert -n -B BASE` writes what the sources' top layers hold into an existing target
/// and leaves the rest of it alone: the target keeps its own backing file (if any), and
/// BASE itself is not opened.
#[test]
fn convert_n_with_a_backing_file_copies_only_the_top_layer_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &["write -P 1 0 4M"]);
    qcow2_image(
        p,
        &["-b", "base.qcow2", "-F", "qcow2"],
        "top.qcow2",
        "4M",
        &["write -P 2 1M 1M", "write -z 3M 512k"],
    );
    qcow2_image(p, &[], "old.qcow2", "4M", &["write -P 7 0 4M"]);
    for extra in [&[][..], &["-S", "0"]] {
        for (target, fmt) in [("t.qcow2", "qcow2"), ("t.raw", "raw")] {
            let (ours, theirs) = (format!("ours-{target}"), format!("theirs-{target}"));
            for name in [&ours, &theirs] {
                match fmt {
                    "qcow2" => qcow2_image(
                        p,
                        &["-b", "old.qcow2", "-F", "qcow2"],
                        name,
                        "4M",
                        &["write -P 9 0 2M"],
                    ),
                    _ => std::fs::write(p.join(name), vec![9u8; 4 << 20]).unwrap(),
                }
            }
            let args = |t: &str| {
                let mut v = vec!["convert", "-n", "-O", fmt, "-B", "nosuch.qcow2"];
                v.extend(extra);
                v.extend(["top.qcow2", t]);
                v.into_iter().map(String::from).collect::<Vec<_>>()
            };
            assert_eq!(qimg(p, &args(&ours)), (0, String::new()));
            assert_eq!(qemu(p, &args(&theirs)), (0, String::new()));
            assert_eq!(
                qemu(p, &["compare", "-f", fmt, "-F", fmt, &ours, &theirs]).0,
                0,
                "{target} {extra:?}"
            );
            if fmt == "qcow2" {
                let map = |f: &str| qemu(p, &["map", "--output=json", f]).1;
                assert_eq!(map(&ours), map(&theirs), "{extra:?}");
                assert_eq!(
                    info_sans_sizes(p, &ours, &ours),
                    info_sans_sizes(p, &theirs, &theirs)
                );
            }
        }
    }
    same(
        p,
        &[
            "convert",
            "-n",
            "-B",
            "base.qcow2",
            "--target-is-zero",
            "top.qcow2",
            "ours-t.raw",
        ],
    );
    same(
        p,
        &[
            "convert",
            "-n",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "top.qcow2",
            "ours-t.raw",
        ],
    );
}

/// measure checks the `-o` options as QEMU's `qcow2_measure` and `raw_measure` do: every
/// name and value type of the format and file drivers, then only what changes the size
/// (combinations only `create` refuses pass), with QEMU's words.
#[test]
fn measure_checks_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &[]);
    for o in [
        "nocow=on,extent_size_hint=1M",
        "compat=0.10,lazy_refcounts=on",
        "data_file_raw=on",
        "backing_fmt=qcow2",
        "compat=0.10,data_file=x",
        "compat=0.10,extended_l2=on",
        "backing_file=x,data_file_raw=on,data_file=y",
        "compat=0.10,refcount_bits=8",
        "compat=v3",
        "extended_l2=maybe",
        "preallocation=bad",
        "encryption=on",
        "encrypt.format=luks",
        "refcount_bits=0",
        "cluster_size=0",
        "compat=x,foo=1",
        "help",
        ",",
    ] {
        same(p, &["measure", "--size", "1G", "-O", "qcow2", "-o", o]);
    }
    for o in [
        "foo=bar",
        "cluster_size=4k",
        "preallocation=metadata",
        "nocow=on",
    ] {
        same(p, &["measure", "--size", "1G", "-O", "raw", "-o", o]);
    }
    for args in [
        &["measure", "--size", "-1"][..],
        &["measure", "--size", "-1", "-O", "qcow2"],
        &[
            "measure",
            "--target-format=qcow2",
            "--options=cluster_size=4k",
            "--size=1G",
        ],
        &["measure", "--format=qcow2", "a.qcow2"],
        &["measure", "-f", "qcow2"],
    ] {
        same(p, args);
    }
}

/// check takes `-T`, prints nothing with `-q` in either output form, refuses `-U` with `-r`
/// (a repair writes), and words a file that is not what `-f` says as qemu-img does; `-r`
/// and `--output` are refused in the order they come.
#[test]
fn check_options_and_open_errors_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &["write -P 1 0 64k"]);
    std::fs::write(p.join("odd.raw"), vec![0x5au8; 100_000]).unwrap();
    qcow2_image(p, &[], "t.qcow2", "1M", &[]);
    for args in [
        &["check", "-T", "none", "a.qcow2"][..],
        &["check", "-T", "bogus", "a.qcow2"],
        &["check", "--output=json", "-q", "a.qcow2"],
        &["check", "-q", "a.qcow2"],
        &["check", "-U", "-r", "all", "a.qcow2"],
        &["check", "-U", "-r", "leaks", "missing.qcow2"],
        &["check", "-U", "-f", "raw", "-r", "all", "odd.raw"],
        &["check", "-U", "a.qcow2"],
        &["check", "-f", "qcow2", "odd.raw"],
        &["check", "-r", "bad", "--output=xml", "a.qcow2"],
        &["check", "--output=xml", "-r", "bad", "a.qcow2"],
        &[
            "convert", "-O", "qcow2", "-B", "odd.raw", "-F", "qcow2", "a.qcow2", "t.qcow2",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "a.qcow2", "-F", "foo", "a.qcow2", "t.qcow2",
        ],
    ] {
        same(p, args);
    }
}

/// A format name qimg (and QEMU) does not know is refused with the block layer's words,
/// naming the image it was to open; dd words its own refusals (operands, an output it cannot
/// create) as qemu-img does.
#[test]
fn unknown_formats_and_dd_refusals_are_worded_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "a.qcow2", "1M", &["write -P 1 0 64k"]);
    qcow2_image(p, &[], "big.qcow2", "4M", &[]);
    for args in [
        &["info", "-f", "foo", "a.qcow2"][..],
        &["info", "-f", "foo", "missing.qcow2"],
        &["check", "-f", "foo", "a.qcow2"],
        &["check", "-f", "foo", "missing.qcow2"],
        &["measure", "-f", "foo", "a.qcow2"],
        &["convert", "-f", "foo", "a.qcow2", "o.raw"],
        &["convert", "-O", "foo", "a.qcow2", "o.raw"],
        &["convert", "-n", "-O", "foo", "a.qcow2", "big.qcow2"],
        &["dd", "-f", "foo", "if=a.qcow2", "of=o.raw"],
        &["dd", "-O", "foo", "if=a.qcow2", "of=o.raw"],
        &["dd", "-O", "foo", "if=missing.qcow2", "of=o.raw"],
        &["map", "-f", "foo", "a.qcow2"],
        &["compare", "-F", "foo", "a.qcow2", "a.qcow2"],
        &["resize", "-f", "foo", "missing.qcow2", "2M"],
        &["rebase", "-f", "foo", "-u", "-b", "x", "a.qcow2"],
        &["commit", "-f", "foo", "a.qcow2"],
        &["amend", "-f", "foo", "-o", "size=1M", "missing.qcow2"],
        &["bench", "-f", "foo", "a.qcow2"],
        &["snapshot", "-f", "foo", "-l", "missing.qcow2"],
        &["create", "-f", "foo", "o.raw", "1M"],
        &[
            "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "foo", "o.qcow2", "1M",
        ],
        &["dd", "foo=1", "if=a.qcow2", "of=o.raw"],
        &["dd", "foo", "if=a.qcow2", "of=o.raw"],
        &["dd", "if=a.qcow2", "of=nodir/x.raw"],
        &["dd", "-O", "qcow2", "if=a.qcow2", "of=nodir/x.qcow2"],
    ] {
        same(p, args);
    }
}

/// The long options of qemu-img 10.0 that name options qimg has work as their short forms.
#[test]
fn long_options_of_qemu_img_10_work_like_their_short_forms() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "1M", &["write -P 1 0 1M"]);
    qcow2_image(
        p,
        &["-b", "base.qcow2", "-F", "qcow2"],
        "a.qcow2",
        "1M",
        &["write -P 2 0 64k"],
    );
    for args in [
        &["check", "--quiet", "a.qcow2"][..],
        &["check", "--format=qcow2", "--cache=none", "a.qcow2"],
        &["check", "--repair=leaks", "--format", "qcow2", "a.qcow2"],
        &["info", "--format=qcow2", "-b", "a.qcow2"],
        &[
            "measure",
            "--format=qcow2",
            "--target-format=qcow2",
            "a.qcow2",
        ],
        &[
            "measure",
            "--target-format",
            "qcow2",
            "--options",
            "cluster_size=4k",
            "--size=1G",
        ],
        &[
            "dd",
            "--format=qcow2",
            "--output-format=qcow2",
            "if=a.qcow2",
            "of=o.qcow2",
        ],
        &[
            "convert",
            "--quiet",
            "--source-format=qcow2",
            "--sparse-size=8k",
            "--parallel=2",
            "--source-cache=none",
            "--output-format=qcow2",
            "--options=cluster_size=4k",
            "--output-cache=none",
            "--backing=base.qcow2",
            "--backing-format=qcow2",
            "--oob-writes",
            "a.qcow2",
            "o.qcow2",
        ],
    ] {
        same(p, args);
    }
    assert_eq!(qemu(p, &["compare", "a.qcow2", "o.qcow2"]).0, 0);
    same(p, &["info", "o.qcow2"]);
    same(p, &["map", "--format=qcow2", "a.qcow2"]);
    // Commands that change the image, each on copies made by either tool.
    for args in [
        &[
            "create",
            "--quiet",
            "--format=qcow2",
            "--options=cluster_size=4k",
            "--backing=base.qcow2",
            "--backing-format=qcow2",
            "--backing-unsafe",
            "X",
            "1M",
        ][..],
        &["resize", "--quiet", "--format=qcow2", "X", "2M"],
        &["amend", "--options=compat=0.10", "X"],
        &[
            "rebase",
            "--quiet",
            "--progress",
            "--format=qcow2",
            "--cache=writeback",
            "--backing-cache=writeback",
            "--compress",
            "--force-share",
            "--backing=",
            "X",
        ],
        &[
            "rebase",
            "--backing-unsafe",
            "--backing=base.qcow2",
            "--backing-format=qcow2",
            "X",
        ],
        &[
            "commit",
            "--quiet",
            "--progress",
            "--format=qcow2",
            "--cache=writeback",
            "--rate=1G",
            "--drop",
            "X",
        ],
    ] {
        // (commit --drop writes the same data into base.qcow2 twice.)
        for img in ["theirs.qcow2", "ours.qcow2"] {
            std::fs::copy(p.join("a.qcow2"), p.join(img)).unwrap();
        }
        let (theirs, ours) = (
            run_with_stderr(p, "qemu-img", "qemu-img", &with_name(args, "theirs.qcow2")),
            run_with_stderr(
                p,
                env!("CARGO_BIN_EXE_qimg"),
                "qimg",
                &with_name(args, "ours.qcow2"),
            ),
        );
        assert_eq!(ours.0, 0, "{args:?}: {ours:?}");
        assert_eq!(ours, theirs, "{args:?}");
        same(p, &["compare", "theirs.qcow2", "ours.qcow2"]);
    }
}

/// Options that cannot go together are refused with QEMU's words, the first one in QEMU's
/// order when several clash.
#[test]
fn clashing_create_options_are_refused_in_qemu_s_order() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for o in [
        "compat=0.10,data_file=x",
        "compat=0.10,data_file=x,compression_type=zstd",
        "compat=0.10,refcount_bits=8,data_file=x,compression_type=zstd",
        "compat=0.10,lazy_refcounts=on,refcount_bits=8,data_file=x",
        "compat=0.10,extended_l2=on,lazy_refcounts=on",
        "compat=0.10,extended_l2=on,cluster_size=4k",
        "extended_l2=on,cluster_size=4k,preallocation=metadata,backing_file=b,backing_fmt=raw",
        "preallocation=falloc,backing_file=b,backing_fmt=raw,backing_fmt=qcow2",
        "backing_fmt=qcow2,preallocation=metadata",
        "data_file_raw=on,backing_file=b,backing_fmt=raw",
    ] {
        same(p, &["create", "-f", "qcow2", "-o", o, "n.qcow2", "1M"]);
        assert!(!p.join("n.qcow2").exists(), "{o}");
    }
}

/// A raw image opened for writing without `-f` gets QEMU's warning from every command, and a
/// file with the qcow2 magic but version 0 probes as raw, as in QEMU.
#[test]
fn probing_and_its_warnings_follow_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let (code, _) = qemu(p, &["create", "-q", "-f", "raw", "a.raw", "4M"]);
    assert_eq!(code, 0);
    let mut v0 = vec![0u8; 1 << 20];
    v0[..8].copy_from_slice(b"QFI\xfb\0\0\0\0");
    std::fs::write(p.join("v0.img"), v0).unwrap();
    for args in [
        &["resize", "X", "+1M"][..],
        &["snapshot", "-c", "s", "X"],
        &["snapshot", "-l", "X"],
        &["amend", "-o", "size=8M", "X"],
        &["commit", "X"],
        &["rebase", "-b", "", "X"],
        &["map", "X"],
        &["info", "X"],
    ] {
        for img in ["a.raw", "v0.img"] {
            std::fs::copy(p.join(img), p.join("copy.img")).unwrap();
            let theirs = run_with_stderr(p, "qemu-img", "qemu-img", &with_name(args, "copy.img"));
            std::fs::copy(p.join(img), p.join("copy.img")).unwrap();
            let ours = run_with_stderr(
                p,
                env!("CARGO_BIN_EXE_qimg"),
                "qimg",
                &with_name(args, "copy.img"),
            );
            assert_eq!(ours, theirs, "{args:?} on {img}");
        }
    }
}

/// A file too short for a qcow2 header that starts with the magic and a version is probed
/// as qcow2 and refused, as QEMU, which reads past the end as zeros, refuses it; a virtual
/// size that is no multiple of 512 is rounded down to whole sectors. As qemu-img.
#[test]
fn short_headers_and_odd_sizes_read_as_qemu_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let mut v3 = b"QFI\xfb\0\0\0\x03".to_vec();
    std::fs::write(p.join("v3.img"), &v3).unwrap();
    v3.resize(103, 0);
    std::fs::write(p.join("v3_103.img"), &v3).unwrap();
    let mut v1 = b"QFI\xfb\0\0\0\x01".to_vec();
    v1.resize(47, 0);
    std::fs::write(p.join("v1.img"), &v1).unwrap();
    for img in ["v3.img", "v3_103.img", "v1.img"] {
        for args in [
            &["info", "X"][..],
            &["check", "X"],
            &["convert", "-O", "raw", "X", "out.raw"],
        ] {
            let args = with_name(args, img);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if img == "v1.img" {
                // QEMU's qcow (v1) driver words its refusal its own way.
                assert_eq!(qimg(p, &args).0, qemu(p, &args).0, "{args:?}");
                assert_ne!(qimg(p, &args).0, 0, "{args:?}");
            } else {
                same(p, &args);
            }
        }
    }
    qcow2_image(p, &[], "odd.qcow2", "1M", &["write -P 1 0 512k"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("odd.qcow2"))
            .unwrap();
        f.write_all_at(&1_000_100u64.to_be_bytes(), 24).unwrap();
    }
    for args in [
        &["info", "odd.qcow2"][..],
        &["info", "--output=json", "odd.qcow2"],
        &["map", "--output=json", "odd.qcow2"],
        &["check", "odd.qcow2"],
        &["measure", "-O", "qcow2", "odd.qcow2"],
    ] {
        same(p, args);
    }
    assert_eq!(
        qimg(p, &["convert", "-O", "raw", "odd.qcow2", "o.raw"]).0,
        0
    );
    let len = std::fs::metadata(p.join("o.raw")).unwrap().len();
    assert_eq!(len, 999_936);
}

/// `rebase -p` and `commit -p` show qemu-img's progress lines on stdout, from 0 to 100 %.
#[test]
fn rebase_and_commit_progress_goes_to_stdout_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "8M", &["write -P 1 0 2M"]);
    qcow2_over(p, "base.qcow2", "top.qcow2", "8M", &["write -P 2 4M 2M"]);
    for args in [
        &["rebase", "-p", "-b", "", "X"][..],
        &["rebase", "-p", "-u", "-b", "", "X"],
        &["commit", "-p", "-d", "X"],
    ] {
        for (tool, prog) in [
            ("qemu-img", "qemu-img"),
            (env!("CARGO_BIN_EXE_qimg"), "qimg"),
        ] {
            std::fs::copy(p.join("top.qcow2"), p.join("copy.qcow2")).unwrap();
            let run = Command::new(tool)
                .current_dir(p)
                .args(with_name(args, "copy.qcow2"))
                .output()
                .unwrap();
            let (out, err) = (
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr),
            );
            assert_eq!((run.status.code(), &*err), (Some(0), ""), "{prog} {args:?}");
            let lines: Vec<&str> = out.split('\r').collect();
            assert_eq!(
                lines.first(),
                Some(&"    (0.00/100%)"),
                "{prog} {args:?}: {out:?}"
            );
            let end = match args[0] {
                "commit" => "\nImage committed.\n",
                _ => "\n",
            };
            assert_eq!(lines.last(), Some(&end), "{prog} {args:?}: {out:?}");
            assert_eq!(
                lines[lines.len() - 2],
                "    (100.00/100%)",
                "{prog} {args:?}: {out:?}"
            );
        }
    }
    // Without -b, and with a new backing file that cannot be opened.
    same(p, &["rebase", "top.qcow2"]);
    same(
        p,
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
    );
}

/// `convert -n` into an existing raw file whose size is not a multiple of 512 (a copy made
/// with `cp`): the target counts as its size rounded up, and the copy extends it, as
/// qemu-img does (qimg refused it as past the end of the file).
#[test]
fn convert_n_into_a_raw_file_of_unaligned_size_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let data: Vec<u8> = (0..1_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(p.join("src.raw"), &data).unwrap();
    for target_len in [1_000_001usize, 999_999] {
        let mut results = Vec::new();
        for (bin, prog) in [
            (env!("CARGO_BIN_EXE_qimg"), "qimg"),
            ("qemu-img", "qemu-img"),
        ] {
            let target = format!("{prog}.raw");
            std::fs::write(p.join(&target), vec![0u8; target_len]).unwrap();
            let args = [
                "convert", "-n", "-f", "raw", "-O", "raw", "src.raw", &target,
            ];
            let (code, out, err) = run_with_stderr(p, bin, prog, &args);
            results.push((code, out, err, std::fs::read(p.join(&target)).unwrap()));
        }
        assert_eq!(results[0].0, 0, "{target_len}: {}", results[0].2);
        assert!(results[0] == results[1], "{target_len}: qimg vs qemu-img");
        assert_eq!(results[0].3.len(), 1_000_448);
        assert_eq!(results[0].3[..data.len()], data[..]);
    }
}

/// A convert started with SIGINT ignored (a background job of a non-interactive shell) is
/// not stopped by a SIGINT, as qemu-img, which never catches it, is not: the job finishes.
#[test]
fn an_ignored_sigint_does_not_stop_a_convert() {
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(p.join("src.raw"), &data).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qimg"));
    cmd.current_dir(p)
        .args(["convert", "-r", "8M", "-O", "qcow2", "src.raw", "out.qcow2"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: a signal to our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(qemu(p, &["compare", "src.raw", "out.qcow2"]).0, 0);
}

/// [`same_check_on_copies`], and the two repaired copies are the same bytes.
fn same_repair_on_copies(dir: &Path, img: &str, args: &[&str]) -> (i32, String) {
    let outcome = same_check_on_copies(dir, img, args);
    // cmp(1): a repair may grow the file to gigabytes of holes.
    let copies = ["qimg", "qemu-img"].map(|tool| format!("{tool}-{img}"));
    let (code, out) = run(dir, "cmp", &copies);
    assert_eq!(
        code, 0,
        "check {args:?} {img}: the repaired images differ: {out}"
    );
    outcome
}

/// Metadata tables past the end of the file read as zeros and tables at offset 0 as the
/// header's bytes, as QEMU reads them: info, map and convert open such images as qemu-img
/// does (qimg refused them, or failed the map), check reports them in its words, and its
/// repairs leave the same bytes as qemu-img's.
#[test]
fn tables_past_the_end_or_over_the_header_read_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let images: &[(&str, &[Patch])] = &[
        ("l2_past_eof", &[(L1, copied(0x4000_0000), 8)]),
        ("refblock_past_eof", &[(REFTABLE, 0x4000_0000, 8)]),
        ("reftable_past_eof", &[(48, 0x4000_0000, 8)]),
        ("l1_at_0", &[(40, 0, 8)]),
        ("reftable_at_0", &[(48, 0, 8)]),
    ];
    for &(name, patches) in images {
        let img = format!("{name}.qcow2");
        damaged(p, &img, patches, None);
        for args in [
            &["info", img.as_str()][..],
            &["map", &img],
            &["map", "--output=json", &img],
            &["compare", &img, "l2_past_eof.qcow2"],
        ] {
            same(p, args);
        }
        for args in [&[][..], &["-r", "leaks"], &["-r", "all"]] {
            same_repair_on_copies(p, &img, args);
        }
        let raw = |tool: &str| format!("{tool}-{name}.raw");
        qimg(p, &["convert", "-O", "raw", &img, &raw("qimg")]);
        qemu(p, &["convert", "-O", "raw", &img, &raw("qemu-img")]);
        let read = |f: String| std::fs::read(p.join(f)).unwrap();
        assert!(read(raw("qimg")) == read(raw("qemu-img")), "{name}");
    }
    // Readers map what the tables show: nothing under an L2 table past the end, the data
    // wherever the refcounts are unreadable.
    let (_, map) = qimg(p, &["map", "l2_past_eof.qcow2"]);
    assert_eq!(map.lines().count(), 1, "{map}");
    let (code, map) = qimg(p, &["map", "refblock_past_eof.qcow2"]);
    assert_eq!((code, map.lines().count()), (0, 3), "{map}");
    // Writers other than check still refuse them.
    let (code, _) = qimg(p, &["resize", "reftable_at_0.qcow2", "+1M"]);
    assert_eq!(code, 1);
}

/// `check -r leaks` gives the space of the clusters it frees back to the file system, as
/// qemu-img's discards do (the stale data stayed allocated in the file).
#[test]
fn check_repair_discards_the_clusters_it_frees_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Guest data at host clusters 5 to 8; the entry of the second one is dropped.
    damaged(p, "leak.qcow2", &[(L2 + 8, 0, 8)], None);
    for r in ["leaks", "all"] {
        let (code, err) = same_repair_on_copies(p, "leak.qcow2", &["-r", r]);
        assert_eq!(code, 0, "{err}");
        let blocks = |tool: &str| {
            std::fs::metadata(p.join(format!("{tool}-leak.qcow2")))
                .unwrap()
                .blocks()
        };
        assert_eq!(blocks("qimg"), blocks("qemu-img"), "-r {r}");
        let data = std::fs::read(p.join("qimg-leak.qcow2")).unwrap();
        assert!(data[0x60000..0x70000].iter().all(|&b| b == 0), "-r {r}");
    }
}

/// The snapshot table of `base` (one snapshot) replaced by `table` with `count` entries:
/// written at the end of the file, on a cluster boundary, with the file ending where
/// `table` does.
fn snapshot_table_variant(dir: &Path, base: &str, name: &str, table: &[u8], count: u32) {
    std::fs::copy(dir.join(base), dir.join(name)).unwrap();
    let len = std::fs::metadata(dir.join(name)).unwrap().len();
    let at = len.next_multiple_of(0x10000);
    patch(dir, name, at, table);
    patch(dir, name, 60, &count.to_be_bytes());
    patch(dir, name, 64, &at.to_be_bytes());
}

/// Snapshot table entry `entry` (as QEMU wrote it) with `extra` bytes of extra data: its
/// own as far as they go, then `0xee`.
fn with_extra_data(entry: &[u8], extra: u32) -> Vec<u8> {
    let be16 = |at: usize| usize::from(u16::from_be_bytes([entry[at], entry[at + 1]]));
    let old_extra = u32::from_be_bytes(entry[36..40].try_into().unwrap()) as usize;
    let names = be16(12) + be16(14);
    let mut out = entry[..40].to_vec();
    out[36..40].copy_from_slice(&extra.to_be_bytes());
    let own = &entry[40..40 + old_extra];
    out.extend((0..extra as usize).map(|i| own.get(i).copied().unwrap_or(0xee)));
    out.extend_from_slice(&entry[40 + old_extra..40 + old_extra + names]);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// `check` reads the snapshot table itself, as QEMU's does: entries of a version 3 image
/// without their 16 bytes of extra data are errors (`-r all` rewrites the table), too much
/// extra data or too many snapshots fail the check (`-r all` cuts and drops them), a table
/// partly past the end of the file reads as zeros; info and snapshot -l open or refuse
/// each image in qemu-img's words. qimg refused most of them at open, and passed the rest.
#[test]
fn check_reads_and_repairs_the_snapshot_table_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "base.qcow2");
    qemu(p, &["snapshot", "-c", "s1", "base.qcow2"]);
    let image = std::fs::read(p.join("base.qcow2")).unwrap();
    let at = header_u64(&p.join("base.qcow2"), 64) as usize;
    let entry = with_extra_data(&image[at..], 24);
    // A name that is no UTF-8: QEMU keeps its bytes, and so must a rewrite of the table.
    let mut odd_name = with_extra_data(&entry, 0);
    let name_at = 40 + usize::from(u16::from_be_bytes([odd_name[12], odd_name[13]]));
    odd_name[14..16].copy_from_slice(&4u16.to_be_bytes());
    odd_name.truncate(name_at);
    odd_name.extend_from_slice(b"s\xff\xfe1");
    // That name in check's line about the snapshot's unaligned L1 table.
    let mut odd_name_bad_l1 = odd_name.clone();
    let l1 = u64::from_be_bytes(odd_name[..8].try_into().unwrap());
    odd_name_bad_l1[..8].copy_from_slice(&(l1 + 8).to_be_bytes());
    let variants: [(&str, Vec<u8>, u32); 8] = [
        ("incomplete", with_extra_data(&entry, 0), 1),
        ("odd_name", odd_name, 1),
        ("odd_name_bad_l1", odd_name_bad_l1, 1),
        (
            "extra_data_8",
            [entry.clone(), with_extra_data(&entry, 8)].concat(),
            2,
        ),
        ("too_much_extra_data", with_extra_data(&entry, 2000), 1),
        (
            "then_too_much",
            [entry.clone(), with_extra_data(&entry, 1500)].concat(),
            2,
        ),
        ("cut_short", entry[..20].to_vec(), 1),
        ("too_many", entry.clone(), 70000),
    ];
    for (name, table, count) in &variants {
        snapshot_table_variant(p, "base.qcow2", &format!("{name}.qcow2"), table, *count);
    }
    std::fs::copy(p.join("base.qcow2"), p.join("unaligned.qcow2")).unwrap();
    patch(p, "unaligned.qcow2", 64, &(at as u64 + 8).to_be_bytes());
    let names = variants.iter().map(|v| v.0).chain(["unaligned"]);
    for name in names {
        let img = format!("{name}.qcow2");
        // A name that is no UTF-8 is printed as its bytes.
        let info = same(p, &["info", &img]);
        let list = same(p, &["snapshot", "-l", &img]);
        if name == "odd_name" {
            assert!(info.contains("s\\xff\\xfe1") && list.contains("s\\xff\\xfe1"));
        }
        let (_, err) = same_check_on_copies(p, &img, &[]);
        if name == "odd_name_bad_l1" {
            assert!(
                err.contains("ERROR snapshot 1 (s\\xff\\xfe1) l1_offset="),
                "{err}"
            );
        }
        same_check_on_copies(p, &img, &["-r", "leaks"]);
        if name != "too_many" {
            same_repair_on_copies(p, &img, &["-r", "all"]);
        }
    }
    let expect = [
        (
            "incomplete",
            "",
            2,
            "ERROR snapshot table entry 0 is incomplete",
        ),
        (
            "incomplete",
            "all",
            0,
            "Repairing snapshot table entry 0 is incomplete",
        ),
        (
            "extra_data_8",
            "",
            2,
            "ERROR snapshot table entry 1 is incomplete",
        ),
        (
            "too_much_extra_data",
            "",
            1,
            "PROG: ERROR failed to read the snapshot table: Too much extra metadata in \
             snapshot table entry 0\nYou can force-remove this extra metadata with qemu-img \
             check -r all\nPROG: Check failed: File too large",
        ),
        (
            "then_too_much",
            "all",
            0,
            "Discarding too much extra metadata in snapshot table entry 1 (1500 > 1024)",
        ),
        (
            "cut_short",
            "",
            2,
            "ERROR snapshot table entry 0 is incomplete",
        ),
        (
            "too_many",
            "",
            1,
            "PROG: ERROR snapshot table too large\nYou can force-remove all 4464 overhanging \
             snapshots with qemu-img check -r all",
        ),
        (
            "unaligned",
            "",
            1,
            "PROG: ERROR snapshot table offset invalid\nPROG: Check failed: Invalid argument",
        ),
    ];
    for (name, r, code, line) in expect {
        let args: &[&str] = if r.is_empty() { &[] } else { &["-r", r] };
        let (c, err) = same_check_on_copies(p, &format!("{name}.qcow2"), args);
        assert_eq!(c, code, "{name} -r {r}: {err}");
        assert!(err.contains(line), "{name} -r {r}: {err}");
    }
    // Too many snapshots: the repair drops the overhanging ones, then reads zeros for the
    // rest and fails where qemu-img fails (writing the new table over the one it read).
    let outcomes = run_on_copies(p, "too_many.qcow2", &["check", "-r", "all", "X"], |_| ());
    for (code, _, err, ()) in &outcomes {
        assert_eq!(*code, 1, "{err}");
        assert!(
            err.starts_with("Discarding 4464 overhanging snapshots\n"),
            "{err}"
        );
        assert!(
            err.ends_with("PROG: Check failed: Input/output error\n"),
            "{err}"
        );
    }
    assert_eq!(outcomes[0].2, outcomes[1].2);
    // After the repair the table is whole: qemu-img finds nothing wrong with it.
    let (code, out) = qemu(p, &["check", "qimg-incomplete.qcow2"]);
    assert_eq!(code, 0, "{out}");
}

/// The external-data-file bit without a data file name: info shows the image, as QEMU
/// opens it without I/O for info; commands that read guest data refuse it in qemu-img's
/// words (qimg refused info too).
#[test]
fn the_data_file_bit_without_a_name_is_refused_only_for_guest_data_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    layout_qcow2(p, "df.qcow2");
    set_feature_bit(&p.join("df.qcow2"), 72, 2, true);
    for args in [
        &["info", "df.qcow2"][..],
        &["info", "--output=json", "df.qcow2"],
        &["check", "df.qcow2"],
        &["map", "df.qcow2"],
    ] {
        same(p, args);
    }
    assert_eq!(qimg(p, &["info", "df.qcow2"]).0, 0);
    assert_eq!(qimg(p, &["map", "df.qcow2"]).0, 1);
}

/// Where the L2 table of the first L1 entry of image `name` lies.
fn first_l2_table(dir: &Path, name: &str) -> u64 {
    let l1 = header_u64(&dir.join(name), 40);
    header_u64(&dir.join(name), l1) & 0x00ff_ffff_ffff_fe00
}

/// L2 entries QEMU refuses to read, as corruption in its words: a zero cluster in a version
/// 2 image, a compressed cluster or a cluster away from its guest offset in an image with
/// an external data file (qimg read them as zeros, or from wherever they pointed).
#[test]
fn entries_qemu_does_not_read_are_refused_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let writes = ["write -P 1 0 256k", "write -P 2 32M 64k"];
    qcow2_image(p, &["-o", "compat=0.10"], "v2.qcow2", "64M", &writes);
    let data_file = ["-o", "data_file=ext.data"];
    qcow2_image(p, &data_file, "ext.qcow2", "64M", &writes);
    let images: [(&str, &str, u64, u64); 4] = [
        ("v2.qcow2", "v2_zero.qcow2", 8, copied(0x60000) | 1),
        ("v2.qcow2", "v2_plain_zero.qcow2", 24, 1),
        ("ext.qcow2", "ext_moved.qcow2", 8, copied(0x30000)),
        ("ext.qcow2", "ext_compressed.qcow2", 8, 1 << 62 | 0x30000),
    ];
    for (base, img, at, entry) in images {
        std::fs::copy(p.join(base), p.join(img)).unwrap();
        let l2 = first_l2_table(p, img);
        patch(p, img, l2 + at, &entry.to_be_bytes());
        for args in [
            &["map", img][..],
            &["map", "--output=json", img],
            &["compare", img, base],
            &["convert", "-O", "raw", img, "out.raw"],
        ] {
            same(p, args);
        }
        same_check_on_copies(p, img, &[]);
        let (code, _) = qimg(p, &["map", img]);
        assert_eq!(code, 1, "{img}");
    }
}

/// `bitmap` opens the image alone, as qemu-img does: a missing backing file does not stop
/// it (qimg opened the chain and failed), and a granularity of 0 is the default one.
#[test]
fn bitmap_opens_the_image_without_its_backing_chain_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &[]);
    qcow2_over(p, "base.qcow2", "top.qcow2", "4M", &[]);
    std::fs::remove_file(p.join("base.qcow2")).unwrap();
    for args in [
        &["bitmap", "--add", "X", "b"][..],
        &["bitmap", "--add", "-g", "0", "X", "b"],
        &["bitmap", "--add", "X", "b", "--disable"],
    ] {
        // The bitmaps as qemu-img lists them (the file layouts differ).
        let outcomes = run_on_copies(p, "top.qcow2", args, |copy| {
            let info = qemu(p, &["info", "--output=json", "-U", copy]).1;
            let from = info.find("\"bitmaps\"").unwrap_or(0);
            let to = info.find("\"refcount-bits\"").unwrap_or(info.len());
            info[from.min(to)..to].to_owned()
        });
        assert_eq!(outcomes[0].0, 0, "{args:?}: {}", outcomes[0].2);
        assert!(outcomes[0].3.contains("\"granularity\": 65536"), "{args:?}");
        assert_eq!(outcomes[0], outcomes[1], "{args:?}");
    }
}

/// Errors of commit and bitmap in qemu-img's words: a base named for an image without a
/// backing file is not in its chain ("Image does not have a backing file" said qimg), and a
/// merge into a raw image misses its target bitmap (qimg named the source's).
#[test]
fn commit_and_bitmap_errors_are_worded_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "4M", &[]);
    qcow2_image(p, &[], "src.qcow2", "4M", &[]);
    std::fs::write(p.join("a.raw"), vec![0u8; 1 << 20]).unwrap();
    for args in [
        &["commit", "-b", "base.qcow2", "base.qcow2"][..],
        &["commit", "base.qcow2"],
        &[
            "bitmap",
            "--merge",
            "sb",
            "-b",
            "src.qcow2",
            "-f",
            "raw",
            "a.raw",
            "b0",
        ],
    ] {
        same(p, args);
    }
}

/// A Linux file name is bytes and need not be UTF-8. The header keeps such a backing file
/// name as it is (a bitmap added to the overlay rewrote it with U+FFFD), the engine opens it
/// (convert), and where qimg's own names, all UTF-8, cannot reach it, it says so and exits 1
/// (an argument that was not UTF-8 panicked).
#[test]
fn file_names_that_are_not_utf8_are_kept_and_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let base = OsStr::from_bytes(b"caf\xe9.qcow2");
    let os = |s: &'static str| OsStr::new(s);
    let ok = |(code, out): (i32, String)| assert_eq!(code, 0, "{out}");
    ok(qemu(
        p,
        &[
            os("create"),
            os("-q"),
            os("-f"),
            os("qcow2"),
            base,
            os("1M"),
        ],
    ));
    let write = [os("-c"), os("write -P 0x5a 0 64k"), base];
    ok(run(p, "qemu-io", &write));
    let overlay = [
        os("create"),
        os("-q"),
        os("-f"),
        os("qcow2"),
        os("-b"),
        base,
    ];
    ok(qemu(
        p,
        &[&overlay[..], &[os("-F"), os("qcow2"), os("top.qcow2")]].concat(),
    ));

    ok(qimg(p, &["bitmap", "--add", "top.qcow2", "b0"]));
    let header = std::fs::read(p.join("top.qcow2")).unwrap();
    let at = header_u64(&p.join("top.qcow2"), 8) as usize;
    assert_eq!(&header[at..at + base.len()], base.as_bytes());
    assert_eq!(
        header_u64(&p.join("top.qcow2"), 16) >> 32,
        base.len() as u64
    );
    ok(qemu(p, &["check", "top.qcow2"]));

    ok(qimg(p, &["convert", "-O", "raw", "top.qcow2", "out.raw"]));
    ok(qemu(p, &[os("compare"), os("out.raw"), base]));

    // info and snapshot -l print such names (backing file, snapshot, bitmap) as their bytes,
    // JSON with U+FFFD, as qemu-img does; also with the backing file's actual path.
    let odd = OsStr::from_bytes(b"s\xff\xfe1");
    ok(qemu(p, &[os("snapshot"), os("-c"), odd, os("top.qcow2")]));
    // JSON decodes names as QEMU's mod_utf8_codepoint does: a surrogate, a noncharacter,
    // an overlong NUL, a code point past U+10FFFF, one past the BMP.
    for name in [
        &b"a\xed\xa0\x80b"[..],
        b"c\xef\xbf\xbed",
        b"e\xc0\x80f",
        b"i\xf4\x90\x80\x80j",
        b"g\xf0\x9f\x98\x80h",
    ] {
        let name = OsStr::from_bytes(name);
        ok(qemu(p, &[os("snapshot"), os("-c"), name, os("top.qcow2")]));
    }
    ok(qemu(p, &[os("bitmap"), os("--add"), os("top.qcow2"), odd]));
    std::fs::create_dir(p.join("sub")).unwrap();
    for name in [OsStr::new("top.qcow2"), base] {
        std::fs::copy(p.join(name), p.join("sub").join(name)).unwrap();
    }
    for img in ["top.qcow2", "sub/top.qcow2"] {
        for args in [
            &["info", img][..],
            &["info", "--output=json", img],
            &["snapshot", "-l", img],
        ] {
            let out = same(p, args);
            assert!(
                out.contains("\\xff\\xfe1") || out.contains("\\uFFFD"),
                "{out}"
            );
        }
    }

    for (args, why) in [
        (
            &[os("map"), os("top.qcow2")][..],
            "qimg handles only file names that are UTF-8",
        ),
        (
            &[os("info"), base],
            "argument 'caf\u{fffd}.qcow2' is not UTF-8",
        ),
    ] {
        let (code, _, stderr) = run_with_stderr(p, env!("CARGO_BIN_EXE_qimg"), "qimg", args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}

/// With -c a target cluster is written whole, from the sources: a zero or backing span that
/// covers part of a cluster makes the whole cluster data, as qemu-img makes it. qimg wrote
/// the zeros uncompressed, and the rest of the cluster came from the target's backing file.
#[test]
fn compressed_convert_writes_whole_clusters_from_the_sources_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qcow2_image(p, &[], "base.qcow2", "1M", &["write -P 0x11 0 1M"]);
    qcow2_image(p, &[], "other.qcow2", "1M", &["write -P 0x22 0 1M"]);
    let small_clusters = ["-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2"];
    for zeros in ["write -z 0 4k", "write -z 4k 60k", "write -z 60k 72k"] {
        qcow2_image(p, &small_clusters, "top.qcow2", "1M", &[zeros]);
        for backing in ["other.qcow2", "base.qcow2"] {
            let args = [
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-B",
                backing,
                "-F",
                "qcow2",
                "top.qcow2",
            ];
            for out in ["ours.qcow2", "theirs.qcow2"] {
                let _ = std::fs::remove_file(p.join(out));
            }
            assert_eq!(qimg(p, &[&args[..], &["ours.qcow2"]].concat()).0, 0);
            assert_eq!(qemu(p, &[&args[..], &["theirs.qcow2"]].concat()).0, 0);
            let what = format!("{zeros}, -B {backing}");
            assert_eq!(
                qemu(p, &["compare", "ours.qcow2", "theirs.qcow2"]).0,
                0,
                "{what}"
            );
            assert_eq!(
                qemu(p, &["map", "--output=json", "ours.qcow2"]),
                qemu(p, &["map", "--output=json", "theirs.qcow2"]),
                "{what}"
            );
            assert_eq!(qemu(p, &["check", "ours.qcow2"]).0, 0, "{what}");
        }
    }
}
