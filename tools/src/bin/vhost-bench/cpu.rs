//! A process's CPU time from /proc.

use anyhow::{Context, Result};

/// CPU seconds (utime + stime, all threads including io_uring workers) process `pid` has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&stat).with_context(|| format!("parsing {path}"))
}

/// utime + stime of a /proc/PID/stat line, in seconds.
fn parse_stat(stat: &str) -> Result<f64> {
    // The command name is parenthesised and may contain anything, ')' included; utime and
    // stime are fields 14 and 15 of the line, the 12th and 13th after the name.
    let (_, rest) = stat.rsplit_once(')').context("no command name")?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = || -> Result<u64> { Ok(fields.next().context("line too short")?.parse()?) };
    let total = ticks()? + ticks()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(total as f64 / hz as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_after_a_tricky_name() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat(line).unwrap(), 300.0 / hz);
        assert!(parse_stat("42 (x) S 1 2").is_err());
        // Spin until this thread has had 50 ms of CPU (several clock ticks, however loaded
        // the machine): this process's CPU time is then positive.
        let thread_cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime fills the timespec it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
        };
        let start = thread_cpu();
        while thread_cpu() - start < 0.05 {
            std::hint::black_box(start);
        }
        let own = cpu_seconds(std::process::id()).unwrap();
        assert!(own > 0.0 && own < 3600.0, "{own}");
    }
}
