//! The exit events of a connection's worker threads.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Makes the exit events of a backend's workers (`VhostUserBackend::exit_event`) and closes
/// them when dropped. `vhost-user-backend` 0.24 takes each read end with `into_raw_fd` for
/// its epoll set and never closes it, which leaks one eventfd per worker and connection.
///
/// Keep it in the backend: every worker of a connection holds a clone of its backend, so
/// they have all ended when this drops.
#[derive(Default)]
pub struct ExitEvents(Mutex<Vec<RawFd>>);

impl ExitEvents {
    /// A new exit event, or `None` (logged) if none can be made.
    pub fn make(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                tracing::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let consumers = std::mem::take(self.0.get_mut().unwrap_or_else(PoisonError::into_inner));
        for fd in consumers {
            // SAFETY: `fd` is the read end of an exit event made in `make`, whose ownership
            // the library gave up. The workers that used it have ended (see the type's docs):
            // nothing uses the number.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}
