//! The control socket (`--api-socket PATH`): JSON over a unix stream socket, one request per
//! line, one response per line.
//!
//! Requests: `{"command": "info"}`, `"pause"`, `"resume"`, `"counters"`, `"shutdown"`.
//! Every response has `"ok"`; failures add `"error"`. `shutdown` stops the VM like SIGTERM:
//! the backends the VMM started are stopped (flushing their images) and `vmm` exits 0.
//!
//! ```text
//! $ echo '{"command":"info"}' | socat - UNIX-CONNECT:/run/vm1.api
//! {"ok":true,"state":"running","cpus":2,"memory_bytes":536870912,...}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::VmConfig;
use crate::exit::VmEvent;
use crate::vcpu::Vcpus;

/// What `info` reports that does not change while the VM runs.
pub struct VmInfo {
    started: Instant,
    static_info: Value,
}

impl VmInfo {
    /// The VM described by `config`, started at `started`.
    pub fn new(config: &VmConfig, started: Instant) -> Self {
        Self {
            started,
            static_info: json!({
                "cpus": config.cpus,
                "memory_bytes": config.memory.size(),
                "kernel": config.kernel,
                "disks": config.disks.len(),
                "nics": config.nets.len(),
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
enum Request {
    Info,
    Pause,
    Resume,
    Counters,
    Shutdown,
}

/// Listens on `path` (replacing a stale socket) and serves requests on a thread.
pub fn serve(
    path: &Path,
    info: VmInfo,
    vcpus: Arc<Vcpus>,
    events: Sender<VmEvent>,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on API socket {}", path.display()))?;
    let path: PathBuf = path.to_owned();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = serve_client(stream, &info, &vcpus, &events) {
                            tracing::warn!(socket = %path.display(), "API client: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(socket = %path.display(), "API accept: {e}"),
                }
            }
        })
        .context("cannot start the API thread")?;
    Ok(())
}

fn serve_client(
    stream: UnixStream,
    info: &VmInfo,
    vcpus: &Vcpus,
    events: &Sender<VmEvent>,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, info, vcpus, events),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        writeln!(writer, "{response}")?;
    }
    Ok(())
}

fn handle(request: Request, info: &VmInfo, vcpus: &Vcpus, events: &Sender<VmEvent>) -> Value {
    match request {
        Request::Info => {
            let mut v = info.static_info.clone();
            v["ok"] = json!(true);
            v["state"] = json!(if vcpus.is_paused() {
                "paused"
            } else {
                "running"
            });
            v["uptime_s"] = json!(info.started.elapsed().as_secs_f64());
            v
        }
        Request::Pause => {
            vcpus.pause();
            json!({"ok": true, "state": "paused"})
        }
        Request::Resume => {
            vcpus.resume();
            json!({"ok": true, "state": "running"})
        }
        Request::Counters => json!({"ok": true, "vcpu_exits": vcpus.exit_counts()}),
        Request::Shutdown => {
            vcpus.resume();
            let _ = events.send(VmEvent::ApiShutdown);
            json!({"ok": true})
        }
    }
}
