//! Logging to stderr and the one-line error report of a failed run.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// Sends `tracing` events to stderr (colored on a terminal), at `default` and above unless
/// `RUST_LOG` says otherwise.
pub fn init(default: LevelFilter) {
    let mut filter = EnvFilter::builder()
        .with_default_directive(default.into())
        .from_env_lossy();
    // virtio-queue logs an error for every bad chain head a guest makes available, without
    // limit; the daemons report those themselves, rate-limited. `RUST_LOG` naming it wins.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("virtio_queue")) {
        filter = filter.add_directive("virtio_queue=off".parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The error and its causes on one line, without repeating causes whose text the message
/// already contains (several error types print their source in their own message); a
/// multi-line message (QEMU's lock hint) continues after "; ".
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', "; ")
}

/// Counts occurrences of an event a guest can repeat at will (a bad command, a request that
/// fails) and picks the ones worth a log line: the 1st, 2nd, 4th, 8th, ... so that a guest
/// cannot flood the host's log while the first occurrence is still reported at once.
#[derive(Debug, Default)]
pub struct Occurrences(AtomicU64);

impl Occurrences {
    /// Counts one occurrence; its number when it should be logged.
    pub fn count(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_join_on_one_line_without_repeats() {
        let e = anyhow::anyhow!("disk full").context("writing 'a.img'");
        assert_eq!(error_line(&e), "writing 'a.img': disk full");
        let quoted = anyhow::anyhow!("disk full").context("writing 'a.img': disk full");
        assert_eq!(error_line(&quoted), "writing 'a.img': disk full");
        let lines = anyhow::anyhow!("Failed to get lock\nIs another process using it?");
        assert_eq!(
            error_line(&lines),
            "Failed to get lock; Is another process using it?"
        );
    }

    #[test]
    fn occurrences_log_at_powers_of_two() {
        let seen = Occurrences::default();
        let logged: Vec<u64> = (0..1000).filter_map(|_| seen.count()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }
}
