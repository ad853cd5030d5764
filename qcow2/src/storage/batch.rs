//! Several positional writes submitted to io_uring with one system call.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, types, IoUring};

/// Writes every `(offset, bytes)` of `writes` (at most the ring's size) to `file` and waits
/// for all of them; short writes are finished with pwrite.
pub(super) fn write_all(
    ring: &mut IoUring,
    file: &File,
    writes: &[(u64, &[u8])],
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    for (k, (offset, bytes)) in writes.iter().enumerate() {
        let entry = opcode::Write::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32)
            .offset(*offset)
            .build()
            .user_data(k as u64);
        // SAFETY: the buffers are borrowed for this whole call, which waits for every
        // completion before returning; the caller sized `writes` to fit the ring.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut done = 0;
    let mut failed: Option<io::Error> = None;
    while done < writes.len() {
        match ring.submit_and_wait(writes.len() - done) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            done += 1;
            let (offset, bytes) = writes[cqe.user_data() as usize];
            let outcome = match usize::try_from(cqe.result()) {
                Ok(n) if n == bytes.len() => Ok(()),
                // Rare on regular files: finish the rest with a plain write.
                Ok(n) => file.write_all_at(&bytes[n..], offset + n as u64),
                Err(_) => Err(io::Error::from_raw_os_error(-cqe.result())),
            };
            if let Err(e) = outcome {
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}
