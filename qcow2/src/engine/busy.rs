//! Guest clusters with a write in progress, so overlapping writes are serialised.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

/// A set of busy guest cluster ranges with a condition variable to wait on.
#[derive(Default)]
pub struct BusyClusters {
    set: Mutex<HashSet<u64>>,
    freed: Condvar,
}

/// Marks clusters busy until dropped.
pub struct BusyGuard<'a> {
    owner: &'a BusyClusters,
    first: u64,
    count: u64,
}

impl BusyClusters {
    /// Waits until no cluster of `[first, first + count)` is busy, then marks them busy.
    pub fn acquire(&self, first: u64, count: u64) -> BusyGuard<'_> {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        while (first..first + count).any(|c| set.contains(&c)) {
            set = self.freed.wait(set).unwrap_or_else(|p| p.into_inner());
        }
        set.extend(first..first + count);
        BusyGuard {
            owner: self,
            first,
            count,
        }
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.owner.set.lock().unwrap_or_else(|p| p.into_inner());
        for c in self.first..self.first + self.count {
            set.remove(&c);
        }
        self.owner.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_wait_for_each_other() {
        let busy = Arc::new(BusyClusters::default());
        let released = Arc::new(AtomicBool::new(false));
        let g = busy.acquire(10, 5);
        let _other = busy.acquire(15, 1); // disjoint: does not block
        let (b, r) = (busy.clone(), released.clone());
        let t = std::thread::spawn(move || {
            let _g = b.acquire(12, 1);
            assert!(r.load(Ordering::SeqCst), "acquired while still busy");
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(g);
        t.join().unwrap();
    }
}
