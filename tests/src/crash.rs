//! A storage that loses writes not covered by a completed flush, to test crash safety.

use std::io;
use std::sync::Mutex;

use rand::{Rng, SeedableRng};

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    len: u64,
    flushes: usize,
    crash_at_flush: Option<(usize, Survivors)>,
    crashed: Option<Vec<u8>>,
}

/// Which unflushed writes an armed crash keeps.
#[derive(Clone)]
enum Survivors {
    /// A random subset, from this seed.
    Random(u64),
    /// Exactly the writes at these offsets.
    At(Vec<u64>),
}

/// In-memory `qcow2::Storage` whose writes become durable only at `flush`.
#[derive(Default)]
pub struct CrashStorage {
    state: Mutex<State>,
}

fn crash_view(s: &State, rng: &mut impl Rng) -> Vec<u8> {
    let mut img = s.durable.clone();
    let mut survivors: Vec<&(u64, Vec<u8>)> =
        s.pending.iter().filter(|_| rng.random_bool(0.5)).collect();
    for i in (1..survivors.len()).rev() {
        survivors.swap(i, rng.random_range(0..=i));
    }
    for (off, data) in survivors {
        apply(&mut img, *off, data);
    }
    img
}

fn apply(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(data);
}

impl CrashStorage {
    /// What the disk holds after a crash now: the durable bytes plus a random subset of the
    /// unflushed writes, applied in random order (the disk may reorder and drop them).
    ///
    /// If a crash was armed with [`CrashStorage::crash_at_flush`] and happened, returns the
    /// image as it was at that moment instead.
    pub fn crash_image(&self, rng: &mut impl Rng) -> Vec<u8> {
        let s = self.state.lock().expect("lock");
        match &s.crashed {
            Some(img) => img.clone(),
            None => crash_view(&s, rng),
        }
    }

    /// Arms a crash at the start of the `n`th flush from now (the flush's barrier never
    /// completes): the crash image is taken then, with unflushed writes kept at random.
    pub fn crash_at_flush(&self, n: usize, seed: u64) {
        self.arm(n, Survivors::Random(seed));
    }

    /// Like [`CrashStorage::crash_at_flush`], but of the unflushed writes exactly those at
    /// `offsets` survive (the worst subset a test has in mind).
    pub fn crash_at_flush_keeping(&self, n: usize, offsets: &[u64]) {
        self.arm(n, Survivors::At(offsets.to_vec()));
    }

    fn arm(&self, n: usize, survivors: Survivors) {
        let mut s = self.state.lock().expect("lock");
        let at = s.flushes + n;
        s.crash_at_flush = Some((at, survivors));
    }

    /// Whether the armed crash has happened.
    pub fn has_crashed(&self) -> bool {
        self.state.lock().expect("lock").crashed.is_some()
    }
}

impl qcow2::Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().expect("lock");
        let mut view = s.durable.clone();
        for (off, data) in &s.pending {
            apply(&mut view, *off, data);
        }
        buf.fill(0);
        let start = (offset as usize).min(view.len());
        let end = (offset as usize + buf.len()).min(view.len());
        buf[..end - start].copy_from_slice(&view[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("lock");
        s.len = s.len.max(offset + buf.len() as u64);
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.state.lock().expect("lock");
        s.flushes += 1;
        if let Some((at, survivors)) = s.crash_at_flush.clone() {
            if s.flushes == at && s.crashed.is_none() {
                s.crashed = Some(match survivors {
                    Survivors::Random(seed) => {
                        crash_view(&s, &mut rand::rngs::StdRng::seed_from_u64(seed))
                    }
                    Survivors::At(offsets) => {
                        let mut img = s.durable.clone();
                        for (off, data) in s.pending.iter().filter(|(o, _)| offsets.contains(o)) {
                            apply(&mut img, *off, data);
                        }
                        img
                    }
                });
            }
        }
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            apply(&mut s.durable, off, &data);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().expect("lock").len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("lock");
        s.len = len;
        s.durable.truncate(len as usize);
        Ok(())
    }
}
