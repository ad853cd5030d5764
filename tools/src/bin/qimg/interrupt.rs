//! SIGINT and SIGTERM during a long operation: the signal is only recorded, so the operation
//! can stop issuing work, let what is in flight finish and leave its target consistent before
//! the process ends as the signal would have ended it.
//!
//! qemu-img does not catch these signals: it dies of them, so its parent sees "killed by
//! SIGINT" (a shell shows 130, or 143 for SIGTERM). [`Interrupt::die`] ends qimg the same way
//! after the cleanup, so scripts cannot tell the two apart by the exit status.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Records SIGINT and SIGTERM from its creation on (clones share the record).
#[derive(Clone)]
pub struct Interrupt {
    caught: Arc<AtomicUsize>,
}

impl Interrupt {
    /// Starts catching SIGINT and SIGTERM. A second one, while the first is being handled,
    /// takes the signal's default action at once (for a cleanup that hangs).
    pub fn catch() -> anyhow::Result<Interrupt> {
        let caught = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM].into_iter().filter(|&sig| !ignored(sig)) {
            // Registered first, so it sees `armed` as the previous signal left it.
            signal_hook::flag::register_conditional_default(sig, armed.clone())
                .and_then(|_| signal_hook::flag::register(sig, armed.clone()))
                .and_then(|_| signal_hook::flag::register_usize(sig, caught.clone(), sig as usize))
                .context("installing the signal handlers")?;
        }
        Ok(Interrupt { caught })
    }

    /// The signal caught so far, if any.
    pub fn caught(&self) -> Option<i32> {
        match self.caught.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig as i32),
        }
    }

    /// Ends the process as `sig`'s default action does (killed by the signal).
    pub fn die(sig: i32) -> ! {
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        // Not reached for SIGINT and SIGTERM; the shell's convention otherwise.
        std::process::exit(128 + sig)
    }
}

/// Whether `sig` is ignored (inherited: a background job of a non-interactive shell ignores
/// SIGINT). It stays ignored, as for qemu-img, which never catches it.
fn ignored(sig: i32) -> bool {
    // SAFETY: a zeroed `sigaction` is a valid value; with a null new action, sigaction only
    // reads the current one into it.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    let read = unsafe { libc::sigaction(sig, std::ptr::null(), &mut current) } == 0;
    read && current.sa_sigaction == libc::SIG_IGN
}

/// The signal's name as `kill -l` prints it, with the SIG prefix.
pub fn signal_name(sig: i32) -> &'static str {
    signal_hook::low_level::signal_name(sig).unwrap_or("a signal")
}
