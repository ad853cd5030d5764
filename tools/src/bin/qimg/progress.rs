//! `-p` progress: an indicatif bar when stdout is a terminal, otherwise qemu-img's
//! `    (NN.NN/100%)\r` lines on stdout (a new line at each whole percent, 100% at the end).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

enum Mode {
    Off,
    /// qemu-img's form; holds the last percentage printed.
    Plain(Mutex<f64>),
    Bar(ProgressBar),
}

/// Progress of an operation over `total` units (bytes).
pub struct Progress {
    mode: Mode,
    total: u64,
    done: AtomicU64,
}

impl Progress {
    /// Starts showing progress if `enabled`.
    pub fn new(enabled: bool, total: u64) -> Progress {
        let mode = if !enabled {
            Mode::Off
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            Mode::Bar(bar)
        } else {
            print_plain(0.0, "\r");
            Mode::Plain(Mutex::new(0.0))
        };
        Progress {
            mode,
            total: total.max(1),
            done: AtomicU64::new(0),
        }
    }

    /// Records `n` more units done.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(b) => b.inc(n),
            Mode::Plain(last) => {
                let pct = done as f64 * 100.0 / self.total as f64;
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if pct >= *last + 1.0 && pct < 100.0 {
                    *last = pct;
                    print_plain(pct, "\r");
                }
            }
        }
    }

    /// Leaves the display as it is, without completing it (the operation stopped).
    pub fn abandon(&self) {
        if let Mode::Bar(b) = &self.mode {
            b.abandon();
        }
    }

    /// Shows completion.
    pub fn finish(&self) {
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(b) => b.finish(),
            Mode::Plain(_) => print_plain(100.0, "\r\n"),
        }
    }
}

/// qemu-img's own accounting (`util/qemu-progress.c`) for commands that report progress in
/// steps (`compare`): single-precision percentages, a line on stdout at 0 %, at 100 % and
/// whenever the total moved more than `min_skip` points from the last line, and a newline at
/// the end. Nothing is printed unless enabled.
pub struct Steps {
    enabled: bool,
    min_skip: f32,
    current: f32,
    last: f32,
}

impl Steps {
    /// qemu_progress_init.
    pub fn new(enabled: bool, min_skip: f32) -> Steps {
        Steps {
            enabled,
            min_skip,
            current: 0.0,
            last: 0.0,
        }
    }

    /// Shows the start (0 %).
    pub fn start(&mut self) {
        self.step(0.0);
    }

    /// Records `part` more units of `whole` done.
    pub fn advance(&mut self, part: u64, whole: u64) {
        self.step(part as f32 / whole as f32 * 100.0);
    }

    /// qemu_progress_print(delta, 100), in C's `float`.
    fn step(&mut self, delta: f32) {
        let current = (self.current + delta / 100.0 * 100.0).min(100.0);
        self.current = current;
        if current > self.last + self.min_skip
            || current < self.last - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last = current;
            if self.enabled {
                print_plain(f64::from(current), "\r");
            }
        }
    }

    /// qemu_progress_end.
    pub fn end(&self) {
        if self.enabled {
            outln!();
        }
    }
}

fn print_plain(pct: f64, end: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "    ({pct:.2}/100%){end}");
    let _ = out.flush();
}
