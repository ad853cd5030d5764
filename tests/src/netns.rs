//! A network namespace made for one test (its TAP devices, pings from inside it), deleted
//! when dropped. Needs root and `ip` (iproute2); `ping` (iputils-ping) for the pings.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is iproute2 installed?): {e}"))
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    /// Its name.
    pub name: String,
}

impl NetNs {
    /// Creates a namespace with a name unique to this process, call and `tag`, with its
    /// loopback up.
    pub fn new(tag: &str) -> NetNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cowbird-{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let out = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(
            out.status.success(),
            "ip netns add {name} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates belong to the
    /// namespace) and returns its result.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns with a namespace descriptor we own; it moves only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Whether interface `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", name]).status.success()
    }

    /// Pings `ip` from the namespace: returns (transmitted, received).
    pub fn ping(&self, ip: &str, extra: &[&str]) -> (u64, u64) {
        let mut args = vec!["ping", "-q", "-n"];
        args.extend_from_slice(extra);
        args.push(ip);
        let out = self.exec(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| {
                panic!(
                    "no ping summary:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let num = |word: &str| -> u64 {
            let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let i = words
                .iter()
                .position(|w| *w == word)
                .unwrap_or_else(|| panic!("no '{word}' in '{line}'"));
            words[i - 1].parse().unwrap()
        };
        (num("packets"), num("received"))
    }

    /// Sends pings 10 ms apart to `ip` (plus `extra` options) until `count` have been answered
    /// or 20 s have passed; returns (`count`, how many of the pings numbered 1 to `count` were
    /// answered).
    ///
    /// Late replies must not count as lost: once a reply has come, iputils ping ignores `-W`
    /// and exits two round trips after its last request, so on a loaded machine replies that
    /// were only late (the kernel still receives them) would be. With a deadline (`-w`) ping
    /// waits for the replies instead, sending more pings meanwhile; a flow's replies come back
    /// in order, so without loss the first `count` replies are exactly pings 1 to `count`.
    pub fn ping_burst(&self, ip: &str, count: u16, extra: &[&str]) -> (u64, u64) {
        let count_arg = count.to_string();
        let mut args = vec!["ping", "-n", "-c", &count_arg, "-i", "0.01", "-w", "20"];
        args.extend_from_slice(extra);
        args.push(ip);
        let out = self.exec(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut answered = vec![false; usize::from(count)];
        for line in text.lines().filter(|l| l.contains(" bytes from ")) {
            let seq = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(slot) = seq.and_then(|n| answered.get_mut(n.wrapping_sub(1))) {
                *slot = true;
            }
        }
        let got = answered.iter().filter(|&&a| a).count() as u64;
        if got < u64::from(count) {
            eprintln!(
                "ping {args:?}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (u64::from(count), got)
    }

    /// Pings until one reply comes (ARP resolved, frontend up), at most `timeout`.
    pub fn wait_reachable(&self, ip: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping(ip, &["-c", "1", "-W", "1"]).1 == 1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{ip} unreachable after {timeout:?}"
            );
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
