//! Shared helpers for the integration tests: start the real daemon binary, drive it with
//! libblkio's `virtio-blk-vhost-user` driver, and compare images with a model file (the other
//! qemu-img helpers are cowbird_tests').

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use cowbird_tests::process::Proc;

/// Bytes of the shared buffer each client maps.
pub const BUF_LEN: usize = 4 << 20;

/// A running `vhost-blk` process on a socket in a temporary directory.
pub struct Daemon {
    proc: Proc,
    /// The socket path.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `image` with extra arguments and waits for its socket.
    pub fn start(dir: &Path, image: &Path, args: &[&str]) -> Daemon {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_vhost-blk")),
            dir,
            image,
            args,
        )
    }

    /// Starts the daemon as an unprivileged user would run it as far as locked memory goes:
    /// without CAP_IPC_LOCK (dropped with `setpriv`) and with RLIMIT_MEMLOCK at `memlock`
    /// bytes.
    pub fn start_with_memlock(dir: &Path, image: &Path, args: &[&str], memlock: u64) -> Daemon {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--"])
            .arg(env!("CARGO_BIN_EXE_vhost-blk"));
        let limit = libc::rlimit {
            rlim_cur: memlock,
            rlim_max: memlock,
        };
        // SAFETY: setrlimit is async-signal-safe and only touches the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self::spawn(cmd, dir, image, args)
    }

    fn spawn(mut cmd: Command, dir: &Path, image: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("vhost-blk.sock");
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(args)
            .env("RUST_LOG", "debug");
        let mut proc = Proc::spawn("vhost-blk", cmd, dir.join("daemon.log"));
        proc.wait_for_path(&socket, Duration::from_secs(20));
        Daemon { proc, socket }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Number of threads of the daemon process, not counting the kernel's io_uring workers
    /// (`iou-wrk-*`, which serve the rings and exit on their own when idle).
    pub fn threads(&self) -> usize {
        let pid = self.proc.pid();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap_or_else(|e| panic!("threads of vhost-blk {pid}: {e}"))
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|comm| !comm.starts_with("iou-"))
            })
            .count()
    }

    /// The daemon's open file descriptors, each as its `/proc/PID/fd` link target
    /// (`anon_inode:[eventfd]`, `socket:[...]`, a path).
    pub fn open_fds(&self) -> Vec<String> {
        let pid = self.proc.pid();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("descriptors of vhost-blk {pid}: {e}"))
            .filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .map(|target| target.display().to_string())
            .collect()
    }

    /// Memory the daemon has pinned (`VmPin` in /proc/PID/status), in KiB.
    pub fn pinned_kib(&self) -> u64 {
        let pid = self.proc.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmPin:"));
        let kib = line.and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        kib.unwrap_or_else(|| panic!("no VmPin in /proc/{pid}/status:\n{status}"))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Sends `signal` and waits (at most 20 s) for the exit status.
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        self.proc.stop_with(signal)
    }

    /// SIGTERM, expecting a clean exit 0.
    pub fn stop(&mut self) {
        let status = self.stop_with(libc::SIGTERM);
        assert!(
            status.success(),
            "vhost-blk exited with {status}:\n{}",
            self.log()
        );
    }
}

/// A libblkio `virtio-blk-vhost-user` client with one mapped buffer.
pub struct Client {
    // Field order matters: queues and regions must go before the Blkio instance.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

/// Connects to `socket` with `num_queues` queues (retrying while the daemon starts up).
pub fn connect(socket: &Path, num_queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
    connect_with_queue_size(socket, num_queues, read_only, None)
}

/// Like [`connect`], choosing the virtqueue size (libblkio's default is 256).
pub fn connect_with_queue_size(
    socket: &Path,
    num_queues: i32,
    read_only: bool,
    queue_size: Option<i32>,
) -> Result<Client, blkio::Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_connect(socket, num_queues, read_only, queue_size) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline && e.errno() == blkio::Errno::CONNREFUSED => {
                sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn try_connect(
    socket: &Path,
    num_queues: i32,
    read_only: bool,
    queue_size: Option<i32>,
) -> Result<Client, blkio::Error> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
    blkio.set_bool("read-only", read_only)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", num_queues)?;
    if let Some(size) = queue_size {
        blkio.set_i32("queue-size", size)?;
    }
    let started = blkio.start()?;
    let region = blkio.alloc_mem_region(BUF_LEN)?;
    blkio.map_mem_region(&region)?;
    Ok(Client {
        queues: started.queues,
        region,
        blkio,
    })
}

impl Client {
    /// The device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// A blkio property.
    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio.get_u64(name).expect(name)
    }

    /// A blkio property.
    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect(name)
    }

    /// A blkio property.
    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio.get_bool(name).expect(name)
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is BUF_LEN bytes of memory mapped for the client's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, BUF_LEN) }
    }

    fn wait(&mut self, q: usize) -> i32 {
        let mut c: [MaybeUninit<Completion>; 1] = [MaybeUninit::uninit()];
        let mut timeout = Duration::from_secs(20);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within 20 s");
        // SAFETY: do_io filled one completion.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// Writes `data` at `offset` through queue `q`; returns blkio's result (0 or -errno).
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= BUF_LEN);
        self.buf()[..data.len()].copy_from_slice(data);
        let ptr = self.region.addr as *const u8;
        self.queues[q].write(offset, ptr, data.len(), 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Writes several pieces at once through queue `q` (all in flight together), each from
    /// its own part of the buffer starting `buf_skew` bytes in; returns each result.
    pub fn write_many(&mut self, q: usize, pieces: &[(u64, Vec<u8>)], buf_skew: usize) -> Vec<i32> {
        let mut at = buf_skew;
        let mut starts = Vec::new();
        for (_, data) in pieces {
            assert!(at + data.len() <= BUF_LEN);
            self.buf()[at..at + data.len()].copy_from_slice(data);
            starts.push(at);
            at += data.len().next_multiple_of(4096) + buf_skew;
        }
        for (i, ((off, data), start)) in pieces.iter().zip(&starts).enumerate() {
            let ptr = (self.region.addr + start) as *const u8;
            self.queues[q].write(*off, ptr, data.len(), i, ReqFlags::empty());
        }
        self.wait_many(q, pieces.len())
    }

    /// Submits writes of `len` bytes at each offset through queue `q` without waiting for
    /// them.
    pub fn submit_writes(&mut self, q: usize, offsets: &[u64], len: usize) {
        assert!(len <= BUF_LEN);
        let ptr = self.region.addr as *const u8;
        for (i, &off) in offsets.iter().enumerate() {
            self.queues[q].write(off, ptr, len, i, ReqFlags::empty());
        }
        let mut none: [MaybeUninit<Completion>; 0] = [];
        self.queues[q]
            .do_io(&mut none, 0, None, None)
            .expect("submit");
    }

    /// Reads several pieces at once through queue `q`, each into its own part of the buffer
    /// starting `buf_skew` bytes in.
    pub fn read_many(
        &mut self,
        q: usize,
        pieces: &[(u64, usize)],
        buf_skew: usize,
    ) -> Vec<Result<Vec<u8>, i32>> {
        let mut at = buf_skew;
        let mut starts = Vec::new();
        for &(_, len) in pieces {
            assert!(at + len <= BUF_LEN);
            starts.push(at);
            at += len.next_multiple_of(4096) + buf_skew;
        }
        self.buf().fill(0xa5);
        for (i, (&(off, len), start)) in pieces.iter().zip(&starts).enumerate() {
            let ptr = (self.region.addr + start) as *mut u8;
            self.queues[q].read(off, ptr, len, i, ReqFlags::empty());
        }
        let rets = self.wait_many(q, pieces.len());
        rets.into_iter()
            .zip(pieces.iter().zip(&starts))
            .map(|(ret, (&(_, len), &start))| match ret {
                0 => Ok(self.buf()[start..start + len].to_vec()),
                e => Err(e),
            })
            .collect()
    }

    /// Waits for `n` completions tagged 0..n; returns their results by tag.
    fn wait_many(&mut self, q: usize, n: usize) -> Vec<i32> {
        let mut results = vec![i32::MIN; n];
        let mut got = 0;
        while got < n {
            let mut c: Vec<MaybeUninit<Completion>> =
                (0..n).map(|_| MaybeUninit::uninit()).collect();
            let mut timeout = Duration::from_secs(20);
            let k = self.queues[q]
                .do_io(&mut c, 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(k > 0, "no completion within 20 s");
            for slot in &c[..k] {
                // SAFETY: do_io filled the first k completions.
                let done = unsafe { slot.assume_init_read() };
                results[done.user_data] = done.ret;
            }
            got += k;
        }
        results
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= BUF_LEN);
        self.buf()[..len].fill(0xa5);
        let ptr = self.region.addr as *mut u8;
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        match self.wait(q) {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    /// Flushes through queue `q`.
    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    /// Discards a range through queue `q`.
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Zeroes a range through queue `q` (`unmap` allows deallocation).
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait(q)
    }
}

/// A deterministic, position-dependent test pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Asserts the guest-visible content of `image` equals the raw file `model`.
pub fn qemu_img_compare(image: &Path, format: &str, model: &Path) {
    let out = cowbird_tests::run(
        "qemu-img",
        &[
            "compare",
            "-f",
            format,
            "-F",
            "raw",
            image.to_str().expect("utf-8 path"),
            model.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare: image differs from the model:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
