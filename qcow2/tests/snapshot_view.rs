//! Read-only views of internal snapshots of images made by qemu-img and qemu-io.

use std::path::Path;
use std::process::Command;

use qcow2::{open_image, Error, Image, OpenOptions, SnapshotRef};

fn tool(dir: &Path, name: &str, args: &[&str]) {
    let out = Command::new(name)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(out.status.success(), "{name} {args:?}: {out:?}");
}

fn open_at(
    path: &Path,
    snapshot: Option<SnapshotRef>,
    read_only: bool,
) -> qcow2::Result<Box<dyn Image>> {
    open_image(
        path,
        &OpenOptions {
            read_only,
            snapshot,
            ..Default::default()
        },
    )
}

/// The byte at each of `offsets`.
fn bytes_at(img: &dyn Image, offsets: &[u64]) -> Vec<u8> {
    offsets
        .iter()
        .map(|&o| {
            let mut b = [0u8];
            img.read_at(&mut b, o).unwrap();
            b[0]
        })
        .collect()
}

#[test]
fn a_snapshot_reads_as_it_was_taken_and_only_read_only() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tool(
        p,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"],
    );
    tool(p, "qemu-io", &["-c", "write -P 1 0 1M", "a.qcow2"]);
    // Snapshot "2" gets ID 1, snapshot "b" ID 2: `2` names one and is the ID of the other.
    tool(p, "qemu-img", &["snapshot", "-c", "2", "a.qcow2"]);
    tool(
        p,
        "qemu-io",
        &[
            "-c",
            "write -P 2 0 64k",
            "-c",
            "write -P 3 4M 64k",
            "a.qcow2",
        ],
    );
    tool(p, "qemu-img", &["snapshot", "-c", "b", "a.qcow2"]);
    tool(
        p,
        "qemu-io",
        &["-c", "write -z 0 1M", "-c", "write -P 4 7M 4k", "a.qcow2"],
    );
    tool(p, "qemu-img", &["resize", "-q", "a.qcow2", "16M"]);
    let img = p.join("a.qcow2");
    let offsets = [0, 512 << 10, 4 << 20, 7 << 20, 12 << 20];
    let at = |r: Option<SnapshotRef>| {
        let view = open_at(&img, r, true).unwrap();
        assert_eq!(
            view.size(),
            16 << 20,
            "the current virtual size, as qemu-img's -l"
        );
        bytes_at(&*view, &offsets)
    };
    assert_eq!(at(None), [0, 0, 3, 4, 0]);
    assert_eq!(at(Some(SnapshotRef::Id("1".into()))), [1, 1, 0, 0, 0]);
    assert_eq!(at(Some(SnapshotRef::IdOrName("2".into()))), [2, 1, 3, 0, 0]);
    assert_eq!(at(Some(SnapshotRef::IdOrName("b".into()))), [2, 1, 3, 0, 0]);
    assert_eq!(at(Some(SnapshotRef::Name("2".into()))), [1, 1, 0, 0, 0]);
    let both = SnapshotRef::IdAndName {
        id: "2".into(),
        name: "2".into(),
    };
    assert!(matches!(
        open_at(&img, Some(both), true),
        Err(Error::SnapshotNotFound)
    ));
    let one = Some(SnapshotRef::Id("1".into()));
    assert!(matches!(
        open_at(&img, one.clone(), false),
        Err(Error::SnapshotWritable)
    ));
    tool(p, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    assert!(matches!(
        open_at(&p.join("r.raw"), one, true),
        Err(Error::NoSnapshots("raw"))
    ));
}
