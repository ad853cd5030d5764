//! Helpers for Cowbird's cross-crate tests: running the real peers (qemu-img, qemu-io) and
//! comparing what they see with what our crates see.
//!
//! Peers that are missing make the test fail with a message naming the package to install;
//! tests never skip silently.

pub mod crash;
pub mod failing_disk;
pub mod loop_device;
pub mod netns;
pub mod process;
pub mod procfs;
pub mod small_fs;
pub mod stack;
pub mod unreadable_file;
pub mod vring;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qcow2::Image;

/// Runs a peer tool and returns its output; panics with a clear message if it is missing.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}); install it with scripts/install-deps.sh")
    })
}

/// Runs a peer tool and panics (showing its stderr) unless it exits 0.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img` with arguments; must succeed.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-img create -q -f qcow2 ARGS IMAGE SIZE`: a qcow2 image made by qemu-img, `args`
/// being its options (`-o ...`, `-b ... -F ...`, `--object ...`).
pub fn qemu_img_create_qcow2(image: &str, args: &[&str], size: &str) {
    let create = [&["create", "-q", "-f", "qcow2"], args, &[image, size]].concat();
    qemu_img(&create);
}

/// Runs qemu-io commands on a qcow2 image; each command must succeed.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let path = image.to_str().expect("utf-8 path");
    args.push(path);
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// The guest-visible contents according to QEMU (`qemu-img convert -O raw`).
pub fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let dst = out.path().to_str().expect("utf-8");
    qemu_img(&["convert", "-O", "raw", image.to_str().expect("utf-8"), dst]);
    std::fs::read(out.path()).expect("read converted image")
}

/// The contents of internal snapshot `name` of `image` according to QEMU (`qemu-img
/// convert -l NAME -O raw`).
pub fn qemu_snapshot_raw(image: &Path, name: &str) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let (src, dst) = (
        image.to_str().expect("utf-8"),
        out.path().to_str().expect("utf-8"),
    );
    qemu_img(&["convert", "-l", name, "-O", "raw", src, dst]);
    std::fs::read(out.path()).expect("read converted snapshot")
}

/// How many host clusters of the qcow2 image `image` have a nonzero refcount (read by our
/// engine, read-only).
pub fn host_clusters_in_use(image: &Path) -> usize {
    let file = std::fs::File::open(image).expect("open image");
    let len = file.metadata().expect("image size").len();
    let storage = std::sync::Arc::new(qcow2::FileStorage::new(file));
    let opts = qcow2::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let q = qcow2::Qcow2::open_storage(storage, &opts, None).expect("open qcow2");
    (0..len.div_ceil(q.cluster_size()))
        .filter(|&c| q.refcount(c).expect("refcount") > 0)
        .count()
}

/// The guest-visible contents according to our engine.
pub fn our_raw(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).expect("read whole image");
    buf
}

/// Result of `qemu-img check --output=json`: (exit code, corruptions, leaks).
pub fn qemu_check(image: &Path) -> (i32, String) {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().expect("utf-8")],
    );
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Asserts `qemu-img check` reports a clean image.
pub fn assert_qemu_clean(image: &Path) {
    let (code, text) = qemu_check(image);
    assert_eq!(code, 0, "qemu-img check is not clean:\n{text}");
}

/// Asserts two buffers are equal, reporting the first differing offset instead of dumping.
pub fn assert_same(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (0x{i:x}): ours {:#04x}, qemu {:#04x}",
            ours[i], theirs[i]
        );
    }
}

/// Makes the guest bytes `[offset, offset + len)` of `image` read as zeros without touching
/// its metadata: zeroes the host clusters that hold them (as `qemu-img map` finds them);
/// parts not allocated read as zeros already. Safe while a backend has the image open (it
/// caches metadata, not data), so a test that then has the same bytes written again can tell
/// whether that write landed. Checks the result with `qemu-io`.
pub fn wipe_guest_range_in_place(image: &Path, format: &str, offset: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let path = image.to_str().expect("utf-8 path");
    let map = qemu_img(&["map", "-U", "--output=json", "-f", format, path]);
    let map: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map JSON");
    let file = std::fs::File::options()
        .write(true)
        .open(image)
        .expect("open image");
    let end = offset + len;
    let mut covered = 0;
    for extent in map.as_array().expect("qemu-img map: a list") {
        let field = |name: &str| extent[name].as_u64().expect("start and length");
        let (start, length) = (field("start"), field("length"));
        let (from, to) = (start.max(offset), (start + length).min(end));
        if from >= to {
            continue;
        }
        covered += to - from;
        let local_data = extent["data"] == true && extent["depth"] == 0;
        match extent["offset"].as_u64() {
            Some(host) if local_data && extent["compressed"] == false => {
                let zeroes = vec![0u8; (to - from) as usize];
                file.write_all_at(&zeroes, host + (from - start))
                    .expect("wipe image data");
            }
            _ if !local_data && extent["zero"] == true => {}
            _ => panic!("cannot wipe [{from:#x}, {to:#x}) of {path} in place: {extent}"),
        }
    }
    assert_eq!(
        covered, len,
        "qemu-img map of {path} does not cover the range"
    );
    let read_zeros = format!("read -P 0 {offset} {len}");
    run_ok(
        "qemu-io",
        &["-U", "-r", "-f", format, "-c", &read_zeros, path],
    );
}

/// Whether the qcow2 header at the start of `image_bytes` has the dirty bit set (bit 0 of
/// the big-endian incompatible features at bytes 72..80): refcounts lag, lazy refcounts.
pub fn qcow2_dirty_bit(image_bytes: &[u8]) -> bool {
    let incompatible = image_bytes.get(72..80).expect("a qcow2 header (v3)");
    u64::from_be_bytes(incompatible.try_into().expect("8 bytes")) & 1 != 0
}

/// Whether the qcow2 image file `image` is marked dirty now (see [`qcow2_dirty_bit`]).
pub fn qcow2_file_dirty(image: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut header = [0u8; 80];
    std::fs::File::open(image)
        .and_then(|f| f.read_exact_at(&mut header, 0))
        .unwrap_or_else(|e| panic!("reading the header of {}: {e}", image.display()));
    qcow2_dirty_bit(&header)
}

/// A path inside a temp dir, as a String for command lines.
pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Opens an image with our engine.
pub fn open(path: &Path, read_only: bool) -> Box<dyn Image> {
    qcow2::open_image(
        path,
        &qcow2::OpenOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// A deterministic byte pattern for a write at `offset` tagged with `seed`.
pub fn pattern(len: usize, offset: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((offset as usize + i) as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                | 1
        })
        .collect()
}
