//! A file an image names but that was not opened: metadata-only opens (QEMU's
//! BDRV_O_NO_IO, as `qemu-img info` uses) leave the external data file closed, so that an
//! image whose data file is missing can still be inspected.

use std::io;
use std::path::PathBuf;

use super::Storage;

/// Stands in for the unopened file at its path: every access fails and names it.
#[derive(Debug)]
pub struct Unopened(pub PathBuf);

impl Unopened {
    fn refuse<T>(&self) -> io::Result<T> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("'{}' was not opened (metadata-only open)", self.0.display()),
        ))
    }
}

impl Storage for Unopened {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        self.refuse()
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        self.refuse()
    }
    fn flush(&self) -> io::Result<()> {
        self.refuse()
    }
    fn len(&self) -> io::Result<u64> {
        self.refuse()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.refuse()
    }
}
