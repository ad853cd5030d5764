//! Memory maps of the files holding `convert`'s sources, and what makes their read errors
//! errors.
//!
//! Data is written to the target straight from a source's page cache through a map, with no
//! copy into a buffer first. A page the kernel cannot read (a disk error; a file truncated
//! under the map) raises SIGBUS where it is touched, which would kill qimg. The handler
//! installed here replaces such a page of a registered map with a page of zeros and notes the
//! fault for the thread; [`fault_in`] touches every page of a slice before its copy and
//! [`take_fault`] tells whether any failed, so the conversion reports the read error as
//! qemu-img does (an error while reading, exit 1) instead of dying or copying the zeros.

use std::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// A read-only shared memory map of a whole file, unmapped on drop.
pub struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and only read through shared slices.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// The address ranges of the live maps, which the SIGBUS handler may repair. A slot is free
/// when its start is 0.
static REGIONS: [(AtomicUsize, AtomicUsize); 16] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; 16];

/// The page size, set when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

thread_local! {
    /// Set by the SIGBUS handler when a page of a map failed to read on this thread.
    static FAULTED: AtomicBool = const { AtomicBool::new(false) };
    /// The address of the first such fault since the last [`take_fault`].
    static FAULT_ADDRESS: AtomicUsize = const { AtomicUsize::new(0) };
}

impl Mapping {
    /// Maps the whole regular file `fd`; `None` where that is not possible (the caller then
    /// reads instead).
    pub fn new(fd: std::os::unix::io::RawFd) -> Option<Mapping> {
        install_handler();
        // SAFETY: fstat into a zeroed struct of the right type.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `fd` is open for the duration of the call.
        if unsafe { libc::fstat(fd, &mut st) } != 0
            || st.st_mode & libc::S_IFMT != libc::S_IFREG
            || st.st_size <= 0
        {
            return None;
        }
        let len = usize::try_from(st.st_size).ok()?;
        // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the
        // address. The mapping outlives any close of the file descriptor.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let mapping = Mapping {
            ptr: ptr as *const u8,
            len,
        };
        let (start, end) = (ptr as usize, ptr as usize + len);
        // A map the handler would not know is not used: its read errors would kill qimg.
        REGIONS
            .iter()
            .find(|(s, _)| {
                s.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            })?
            .1
            .store(end, Ordering::SeqCst);
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        Some(mapping)
    }

    /// The file's bytes `[off, off + len)`.
    pub fn slice(&self, off: u64, len: u64) -> &[u8] {
        assert!(off + len <= self.len as u64);
        // SAFETY: in bounds of a live read-only mapping. The source is opened read-only and
        // must not be modified or truncated while it is converted (qemu-img's rule too).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off as usize), len as usize) }
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        self.len as u64
    }

    /// Starts reading the pages of `data` into the page cache, if it is a slice of this
    /// mapping (pages there already are left alone).
    pub fn prefetch(&self, data: &[u8]) {
        self.advise(data, libc::MADV_WILLNEED);
    }

    /// Unmaps the whole pages of `data` if it is a slice of this mapping (it stays readable:
    /// a later access maps the page again). Done as soon as a chunk is written, this spreads
    /// the unmapping over the workers instead of leaving it all to the end.
    pub fn release(&self, data: &[u8]) {
        self.advise(data, libc::MADV_DONTNEED);
    }

    /// `madvise(advice)` on the pages of `data` if it is a slice of this mapping: every page
    /// it touches for WILLNEED, only the pages it covers whole otherwise.
    fn advise(&self, data: &[u8], advice: libc::c_int) {
        let page = page_size();
        let (base, addr) = (self.ptr as usize, data.as_ptr() as usize);
        if addr < base || addr + data.len() > base + self.len {
            return;
        }
        let (start, end) = match advice {
            libc::MADV_WILLNEED => (
                addr / page * page,
                (addr + data.len()).next_multiple_of(page),
            ),
            _ => (
                addr.next_multiple_of(page),
                (addr + data.len()) / page * page,
            ),
        };
        if end > start {
            // SAFETY: whole pages inside this read-only file mapping. Neither advice changes
            // a byte anyone reads: WILLNEED only starts reads into the page cache, and after
            // DONTNEED the page cache still holds the file's data.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let start = self.ptr as usize;
        if let Some((s, e)) = REGIONS
            .iter()
            .find(|(s, _)| s.load(Ordering::SeqCst) == start)
        {
            e.store(0, Ordering::SeqCst);
            s.store(0, Ordering::SeqCst);
        }
        // SAFETY: unmaps exactly the mapping made in `new`; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Touches every page of `data` (a slice of a [`Mapping`]), so that pages the kernel cannot
/// read fail here rather than in a later copy (a page that fails inside a system call makes
/// it fail with EFAULT instead). On failure ([`take_fault`]), the offset in `data` of the
/// page that failed.
pub fn fault_in(data: &[u8]) -> Result<(), usize> {
    if let Some(last) = data.len().checked_sub(1) {
        let page = page_size();
        // The first byte, the first byte of every later page, and the last byte.
        let first_page = data.as_ptr() as usize / page * page;
        let later = (first_page + page..=data.as_ptr() as usize + last)
            .step_by(page)
            .map(|a| a - data.as_ptr() as usize);
        for at in std::iter::once(0).chain(later).chain([last]) {
            // SAFETY: `at` is in bounds; a volatile read so that the touch is not optimised
            // away.
            unsafe { std::ptr::read_volatile(data.as_ptr().add(at)) };
        }
    }
    match take_fault() {
        None => Ok(()),
        Some(addr) => Err(addr
            .checked_sub(data.as_ptr() as usize)
            .filter(|&at| at < data.len())
            .unwrap_or(0)),
    }
}

/// The address of the first page of a [`Mapping`] that failed to read on this thread since
/// the last call, if one did; the bytes read from it were zeros.
pub fn take_fault() -> Option<usize> {
    // The handler's stores happen between this thread's instructions: keep the compiler
    // from moving these loads before the reads that fault.
    compiler_fence(Ordering::SeqCst);
    let addr = FAULT_ADDRESS.with(|a| a.swap(0, Ordering::Relaxed));
    FAULTED
        .with(|f| f.swap(false, Ordering::Relaxed))
        .then_some(addr)
}

fn page_size() -> usize {
    PAGE.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler, once.
fn install_handler() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        PAGE.store(
            usize::try_from(page).unwrap_or(4096).max(1),
            Ordering::Relaxed,
        );
        // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature; the handler
        // only makes async-signal-safe system calls and touches atomics and a thread-local
        // `Cell` with a constant initialiser.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

/// The SIGBUS handler: a fault in a registered map gets a page of zeros in place of the
/// page that failed (the access is then repeated and reads zeros) and is noted for the
/// thread; any other SIGBUS, a fault elsewhere or a signal sent by a process, gets the
/// default action (it kills qimg, as without the handler).
extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; `si_addr` is
    // meaningful for the kernel's BUS_ADRERR only (a sender chooses the fields of its own).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let ours = code == libc::BUS_ADRERR
        && REGIONS.iter().any(|(s, e)| {
            let start = s.load(Ordering::SeqCst);
            start != 0 && start <= addr && addr < e.load(Ordering::SeqCst)
        });
    if ours {
        let page = page_size();
        // SAFETY: replaces one page inside a live map of ours (no Rust reference to its
        // bytes can be relied on past the fault: the conversion stops on it).
        let zeros = unsafe {
            libc::mmap(
                (addr / page * page) as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if zeros != libc::MAP_FAILED {
            if !FAULTED.with(|f| f.swap(true, Ordering::Relaxed)) {
                FAULT_ADDRESS.with(|a| a.store(addr, Ordering::Relaxed));
            }
            return;
        }
    }
    // SAFETY: restoring the default action and raising the signal again are
    // async-signal-safe; a fault would repeat anyway, a sent signal would be lost.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}
