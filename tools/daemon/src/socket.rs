//! The vhost-user socket a daemon listens on (or connects to), and how a frontend's
//! connection ended.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::Error as DaemonError;

/// Longest unix socket path that fits `sockaddr_un.sun_path` with its terminating NUL.
pub const MAX_PATH_LEN: usize = 107;

/// Why a daemon's socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A path no unix socket can have.
    #[error("invalid socket path '{}': {reason}", path.display())]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// Another process is listening on the socket.
    #[error("socket '{}' is in use by another process", .0.display())]
    InUse(PathBuf),
    /// The socket path names something other than a socket.
    #[error("'{}' exists and is not a socket; it is left alone", .0.display())]
    NotASocket(PathBuf),
    /// Binding, connecting or accepting failed.
    #[error("socket '{}': {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A unix socket path from the command line: non-empty and short enough for `sockaddr_un`.
pub fn parse_path(s: &str) -> Result<PathBuf, SocketError> {
    let invalid = |reason: String| SocketError::InvalidPath {
        path: PathBuf::from(s),
        reason,
    };
    if s.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if s.len() > MAX_PATH_LEN {
        return Err(invalid(format!(
            "{} bytes long; unix socket paths hold at most {MAX_PATH_LEN}",
            s.len()
        )));
    }
    Ok(PathBuf::from(s))
}

/// Binds `path` to listen for frontends. A stale socket file (nobody accepts on it) is
/// replaced; one a live process listens on is not, nor anything that is not a socket.
pub fn listen(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket is ours to replace: never a file someone typed by mistake.
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    UnixListener::bind(path).map_err(io)
}

/// Longest pause between two attempts to reach a frontend in client mode.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Where a daemon's frontends come from: a socket it listens on (and removes when dropped),
/// or, in client mode, a socket a frontend listens on (QEMU's `server=on` chardev).
pub struct Frontends {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl Frontends {
    /// Binds `path` to listen for frontends (see [`listen`]).
    pub fn listen(path: &Path) -> Result<Frontends, SocketError> {
        Ok(Frontends {
            listener: Some(listen(path)?),
            path: path.to_path_buf(),
        })
    }

    /// Frontends reached by connecting to `path`, where they listen.
    pub fn connect(path: &Path) -> Frontends {
        Frontends {
            listener: None,
            path: path.to_path_buf(),
        }
    }

    /// Whether the daemon connects to its frontends rather than listening.
    pub fn is_client(&self) -> bool {
        self.listener.is_none()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next frontend's connection: accepted, or connected to. In client mode, while
    /// nothing listens at the path (no socket file, or nobody accepting), it retries with a
    /// growing pause of up to [`MAX_RECONNECT_DELAY`], and gives `None` once `stopping()`.
    pub fn next(&self, stopping: impl Fn() -> bool) -> Result<Option<UnixStream>, SocketError> {
        let io = |source| SocketError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(listener) = &self.listener {
            tracing::debug!("waiting for a frontend on {}", self.path.display());
            loop {
                match listener.accept() {
                    Ok((stream, _)) => return Ok(Some(stream)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => return Err(io(e)),
                }
            }
        }
        let mut delay = Duration::from_millis(10);
        let mut waiting = false;
        loop {
            match UnixStream::connect(&self.path) {
                Ok(stream) => return Ok(Some(stream)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if !std::mem::replace(&mut waiting, true) {
                        tracing::info!(
                            "waiting for a frontend to listen on {} ({e})",
                            self.path.display()
                        );
                    }
                    if stopping() {
                        return Ok(None);
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                }
                Err(e) => return Err(io(e)),
            }
        }
    }
}

impl Drop for Frontends {
    fn drop(&mut self) {
        // The frontend's socket is not ours to remove.
        if !self.is_client() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How a frontend's connection ended.
#[derive(Debug)]
pub enum Disconnect {
    /// The frontend closed the connection.
    Closed,
    /// The connection failed (protocol error from the frontend, or a local failure).
    Failed(String),
}

impl Disconnect {
    /// What `VhostUserDaemon::wait` returning `ended` means: the frontend going away in any
    /// of the ways a socket reports it is a close, anything else a failure.
    pub fn from_wait(ended: Result<(), DaemonError>) -> Disconnect {
        match ended {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => Disconnect::Closed,
            Err(DaemonError::HandleRequest(VhostUserError::SocketError(e)))
                if e.kind() == io::ErrorKind::ConnectionReset =>
            {
                Disconnect::Closed
            }
            Err(e) => Disconnect::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_must_fit_sockaddr_un() {
        let longest = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert_eq!(parse_path(&longest).unwrap(), PathBuf::from(&longest));
        let too_long = format!("{longest}a");
        let err = parse_path(&too_long).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid socket path '{too_long}': 108 bytes long; unix socket paths hold at most 107"
            )
        );
        assert!(matches!(
            parse_path(""),
            Err(SocketError::InvalidPath { reason, .. }) if reason == "it is empty"
        ));
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = listen(&path).unwrap();
        assert!(matches!(listen(&path), Err(SocketError::InUse(p)) if p == path));
        drop(live);
        // The file stays behind, with nobody accepting: stale.
        assert!(path.exists());
        let _again = listen(&path).unwrap();

        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"data").unwrap();
        let err = listen(&file).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "'{}' exists and is not a socket; it is left alone",
                file.display()
            )
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn a_frontend_going_away_is_a_close_and_a_protocol_error_a_failure() {
        let closed = [
            Ok(()),
            Err(DaemonError::HandleRequest(VhostUserError::Disconnected)),
            Err(DaemonError::HandleRequest(VhostUserError::PartialMessage)),
            Err(DaemonError::HandleRequest(VhostUserError::SocketError(
                io::ErrorKind::ConnectionReset.into(),
            ))),
        ];
        for ended in closed {
            assert!(matches!(Disconnect::from_wait(ended), Disconnect::Closed));
        }
        let failed = [
            DaemonError::HandleRequest(VhostUserError::InvalidMessage),
            DaemonError::HandleRequest(VhostUserError::SocketError(
                io::ErrorKind::PermissionDenied.into(),
            )),
        ];
        for ended in failed {
            assert!(matches!(
                Disconnect::from_wait(Err(ended)),
                Disconnect::Failed(_)
            ));
        }
    }
}
