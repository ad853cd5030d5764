//! What a running process holds, read from `/proc`: its children, its file descriptors with
//! their flags, and the eventfds it shares with another process.

use std::collections::BTreeMap;
use std::fs;

/// `O_CLOEXEC` as `/proc/PID/fdinfo` prints it (octal `flags:`).
const O_CLOEXEC: u32 = 0o2_000_000;

/// One open file descriptor of a process.
#[derive(Debug, Clone)]
pub struct OpenFd {
    /// The descriptor number.
    pub fd: i32,
    /// Where `/proc/PID/fd/N` points (`anon_inode:[eventfd]`, `socket:[...]`, a path).
    pub target: String,
    /// The `flags:` line of its fdinfo (open flags, `O_CLOEXEC` included).
    pub flags: u32,
    /// For an eventfd, its kernel-wide ID (`eventfd-id:`, Linux 6.2 and later): the same
    /// in every process holding the same eventfd.
    pub eventfd_id: Option<u64>,
}

impl OpenFd {
    /// Whether the descriptor is closed on exec.
    pub fn cloexec(&self) -> bool {
        self.flags & O_CLOEXEC != 0
    }
}

/// The open file descriptors of `pid` (those that close while being read are skipped).
pub fn open_fds(pid: u32) -> Vec<OpenFd> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
    let mut fds: Vec<OpenFd> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(entry.path()).ok()?.display().to_string();
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            let flags = u32::from_str_radix(field("flags:")?, 8).ok()?;
            let eventfd_id = field("eventfd-id:").and_then(|v| v.parse().ok());
            Some(OpenFd {
                fd,
                target,
                flags,
                eventfd_id,
            })
        })
        .collect();
    fds.sort_by_key(|f| f.fd);
    fds
}

/// The eventfds of `pid` by kernel-wide ID. Panics if the kernel does not report the IDs.
pub fn eventfds(pid: u32) -> BTreeMap<u64, OpenFd> {
    open_fds(pid)
        .into_iter()
        .filter(|f| f.target == "anon_inode:[eventfd]")
        .map(|f| {
            let id = f
                .eventfd_id
                .expect("this test needs eventfd-id in /proc/PID/fdinfo (Linux 6.2 or later)");
            (id, f)
        })
        .collect()
}

/// The eventfds `a` and `b` both hold (the same open eventfd, not just an equal number), as
/// `b` sees them.
pub fn shared_eventfds(a: u32, b: u32) -> Vec<OpenFd> {
    let theirs = eventfds(a);
    eventfds(b)
        .into_iter()
        .filter(|(id, _)| theirs.contains_key(id))
        .map(|(_, f)| f)
        .collect()
}

/// The direct children of `pid` (from every process's parent in `/proc/PID/stat`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut children: Vec<u32> = all_pids()
        .into_iter()
        .filter(|&child| parent(child) == Some(pid))
        .collect();
    children.sort_unstable();
    children
}

/// The parent of `pid`: the field after the state, which follows the last ')' of the name.
fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's command line, arguments separated by spaces.
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The processes whose command line contains `text`, oldest first.
pub fn processes_matching(text: &str) -> Vec<u32> {
    let own = std::process::id();
    let mut pids: Vec<u32> = all_pids()
        .into_iter()
        .filter(|&pid| pid != own && cmdline(pid).contains(text))
        .collect();
    pids.sort_unstable();
    pids
}
