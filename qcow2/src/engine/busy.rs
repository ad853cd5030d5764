//! Guest clusters with a request in progress: engine requests that may remap them are
//! serialised against each other and against zero-copy reads and writes in flight.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What holds a busy cluster.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// An engine request, which may remap the cluster: it holds it alone.
    Engine,
    /// A zero-copy write in place: excludes engine requests and other writes, not reads.
    InPlace,
    /// A zero-copy read: excludes engine requests only.
    Read,
}

/// The holders of one busy cluster.
#[derive(Default)]
struct Holders {
    writer: Option<Kind>,
    readers: usize,
}

#[derive(Default)]
struct State {
    held: HashMap<u64, Holders>,
    /// Clusters engine requests wait for, with how many: no new read may hold them, so a
    /// stream of reads cannot starve a request.
    wanted: HashMap<u64, usize>,
}

/// Busy guest clusters with a condition variable to wait on.
#[derive(Default)]
pub struct BusyClusters {
    state: Mutex<State>,
    freed: Condvar,
}

/// Marks clusters busy until dropped. It owns a reference to the set, so it can travel with
/// an I/O request that completes later on another call stack (zero-copy I/O).
pub struct BusyGuard {
    owner: Arc<BusyClusters>,
    first: u64,
    count: u64,
    kind: Kind,
}

impl BusyClusters {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no cluster of `[first, first + count)` is busy, then marks them busy for
    /// an engine request.
    pub fn acquire(self: &Arc<Self>, first: u64, count: u64) -> BusyGuard {
        let mut s = self.lock();
        let range = first..first + count;
        if range.clone().any(|c| s.held.contains_key(&c)) {
            for c in range.clone() {
                *s.wanted.entry(c).or_default() += 1;
            }
            while range.clone().any(|c| s.held.contains_key(&c)) {
                s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            for c in range {
                let n = s.wanted.get_mut(&c).expect("counted above");
                *n -= 1;
                if *n == 0 {
                    s.wanted.remove(&c);
                }
            }
        }
        self.mark(s, first, count, Kind::Engine)
    }

    /// Marks `[first, first + count)` busy for a zero-copy write unless a request other
    /// than a read holds any of it; never waits.
    pub fn try_acquire(self: &Arc<Self>, first: u64, count: u64) -> Option<BusyGuard> {
        self.try_mark(first, count, Kind::InPlace)
    }

    /// Marks `[first, first + count)` busy for a zero-copy read unless an engine request
    /// holds or waits for any of it; never waits.
    pub fn try_acquire_read(self: &Arc<Self>, first: u64, count: u64) -> Option<BusyGuard> {
        self.try_mark(first, count, Kind::Read)
    }

    fn try_mark(self: &Arc<Self>, first: u64, count: u64, kind: Kind) -> Option<BusyGuard> {
        let s = self.lock();
        let refused = |c| {
            let writer = s.held.get(&c).and_then(|h| h.writer);
            writer == Some(Kind::Engine)
                || match kind {
                    Kind::Read => s.wanted.contains_key(&c),
                    _ => writer.is_some(),
                }
        };
        if (first..first + count).any(refused) {
            return None;
        }
        Some(self.mark(s, first, count, kind))
    }

    fn mark(
        self: &Arc<Self>,
        mut s: MutexGuard<'_, State>,
        first: u64,
        count: u64,
        kind: Kind,
    ) -> BusyGuard {
        for c in first..first + count {
            let h = s.held.entry(c).or_default();
            match kind {
                Kind::Read => h.readers += 1,
                _ => h.writer = Some(kind),
            }
        }
        BusyGuard {
            owner: self.clone(),
            first,
            count,
            kind,
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        for c in self.first..self.first + self.count {
            let h = s.held.get_mut(&c).expect("held by this guard");
            match self.kind {
                Kind::Read => h.readers -= 1,
                _ => h.writer = None,
            }
            if h.writer.is_none() && h.readers == 0 {
                s.held.remove(&c);
            }
        }
        self.owner.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

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

    #[test]
    fn try_acquire_refuses_busy_clusters_without_waiting() {
        let busy = Arc::new(BusyClusters::default());
        let g = busy.try_acquire(4, 2).expect("free");
        assert!(busy.try_acquire(5, 3).is_none());
        assert!(busy.try_acquire(6, 3).is_some());
        drop(g);
        assert!(busy.try_acquire(5, 3).is_some());
    }

    #[test]
    fn zero_copy_reads_hold_off_engine_requests_only() {
        let busy = Arc::new(BusyClusters::default());
        let r1 = busy.try_acquire_read(4, 2).expect("free");
        let r2 = busy.try_acquire_read(5, 2).expect("shared with r1");
        let w = busy
            .try_acquire(5, 1)
            .expect("a write in place goes along with reads");
        assert!(busy.try_acquire(5, 1).is_none());
        assert!(busy.try_acquire_read(5, 1).is_some());
        let b = busy.clone();
        let engine = std::thread::spawn(move || drop(b.acquire(5, 1)));
        while busy.lock().wanted.is_empty() {
            std::thread::yield_now();
        }
        assert!(
            busy.try_acquire_read(5, 1).is_none(),
            "an engine request waits for it"
        );
        assert!(busy.try_acquire_read(6, 1).is_some());
        drop((r1, w));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!engine.is_finished(), "a read still holds cluster 5");
        drop(r2);
        engine.join().unwrap();
        let _engine = busy.acquire(4, 3);
        assert!(busy.try_acquire_read(4, 1).is_none());
        assert!(busy.try_acquire(4, 1).is_none());
    }
}
