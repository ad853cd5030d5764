//! Logging to stderr and the one-line error report of a failed run.

use std::io::IsTerminal;

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// Sends `tracing` events to stderr (colored on a terminal), at `default` and above unless
/// `RUST_LOG` says otherwise.
pub fn init(default: LevelFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(default.into())
                .from_env_lossy(),
        )
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
}
