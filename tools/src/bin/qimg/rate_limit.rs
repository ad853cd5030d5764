//! `-r RATE` of `convert` and `commit`: the bytes written to the target, at most RATE per
//! second (qemu-img throttles the target, or the commit job, so); 0 means no limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::interrupt::Interrupt;

/// Longest sleep between looks at [`RateLimit::interruptible`]'s signals.
const SLICE: Duration = Duration::from_millis(20);

/// A byte rate that writers wait for.
pub struct RateLimit {
    bytes_per_second: u64,
    start: Instant,
    /// Bytes let through so far.
    sent: Mutex<u64>,
    /// Waits end early once this caught a signal.
    interrupt: Option<Interrupt>,
}

impl RateLimit {
    /// The limit `-r` gives (`None` without one, or for 0), with qemu-img's errors.
    pub fn parse(arg: Option<&str>) -> anyhow::Result<Option<RateLimit>> {
        let Some(arg) = arg else {
            return Ok(None);
        };
        Ok(match crate::size::cvtnum("rate limit", arg)? {
            0 => None,
            bytes_per_second => Some(RateLimit {
                bytes_per_second,
                start: Instant::now(),
                sent: Mutex::new(0),
                interrupt: None,
            }),
        })
    }

    /// Makes waits end as soon as `interrupt` catches a signal (at a low rate a wait can
    /// take minutes; the writer stops after its current write).
    pub fn interruptible(self, interrupt: Interrupt) -> RateLimit {
        RateLimit {
            interrupt: Some(interrupt),
            ..self
        }
    }

    /// Waits until `bytes` more may be written: the first write goes at once, each later
    /// one when the bytes before it have taken their time at the rate.
    pub fn wait(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let due = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            let before = *sent;
            *sent += bytes;
            self.start + Duration::from_secs_f64(before as f64 / self.bytes_per_second as f64)
        };
        while let Some(left) = due.checked_duration_since(Instant::now()) {
            if self
                .interrupt
                .as_ref()
                .is_some_and(|i| i.caught().is_some())
            {
                return;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_spread_at_the_rate() {
        assert!(RateLimit::parse(Some("0")).unwrap().is_none());
        assert!(RateLimit::parse(Some("x")).is_err());
        let limit = RateLimit::parse(Some("1M")).unwrap().unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            limit.wait(100 << 10);
        }
        // The third write waits for the 200 KiB before it: 0.2 s at 1 MiB/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
