//! The local admin API: a Unix socket (mode 0600, root's only) answering one JSON
//! request per connection with one JSON answer, for `jvpn status`, `jvpn sessions` and
//! `jvpn terminate`. See spec/admin.md.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections are open at once, a request is at
//! most [`MAX_REQUEST`] bytes and must arrive within [`REQUEST_TIMEOUT`], and a
//! connection gets [`CONNECTION_TIMEOUT`] in all. Idle connections cannot lock the
//! socket up: a new connection that finds the table full closes the oldest one still
//! waiting for its request, so a real request is always served.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use jvpn_core::ids::SessionId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time for a connection's request to arrive (a local client writes it at once).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest request line.
pub const MAX_REQUEST: usize = 4096;
/// The longest answer a caller reads (a status of many thousand sessions fits).
pub const MAX_ANSWER: u64 = 64 << 20;
/// Time for one connection, request and answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Everything `jvpn status` shows.
    Status,
    /// End a session (`operator_terminated`).
    Terminate {
        /// 16 hex digits.
        session_id: String,
    },
}

/// What answers requests (one per node).
pub type Answer = Rc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Value>>>>;

/// Admin API failures.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The socket cannot be created.
    #[error("cannot serve the admin socket {path}: {source}")]
    Bind {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket (config key `admin.socket`): refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process serves the socket already.
    #[error("{0} is served by a running process already (is another jvpn running?)")]
    InUse(PathBuf),
    /// The node cannot be reached.
    #[error("cannot reach {path} (is jvpn running, and are you root?): {source}")]
    Connect {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("admin request to {path} failed: {problem}")]
    Exchange {
        /// Where.
        path: PathBuf,
        /// Why.
        problem: String,
    },
}

/// The admin socket, removed when dropped.
pub struct AdminSocket {
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves requests on `path` with `answer`, as a task of the current (actix) runtime.
pub async fn serve(path: &Path, answer: Answer) -> Result<AdminSocket, AdminError> {
    let bind_err = |source| AdminError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(AdminError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        // A stale socket of a process that is gone.
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    let open = Rc::new(RefCell::new(Connections::default()));
    actix_rt::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some((id, evicted)) = open.borrow_mut().admit() else {
                // Full of connections already answering: this one is refused.
                continue;
            };
            let answer = Rc::clone(&answer);
            let open = Rc::clone(&open);
            actix_rt::spawn(async move {
                let served = exchange(stream, answer, evicted, || open.borrow_mut().answering(id));
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, served).await;
                open.borrow_mut().close(id);
            });
        }
    });
    Ok(AdminSocket {
        path: path.to_path_buf(),
    })
}

/// The open connections, in the order they came; those still waiting for their request
/// can be closed to make room.
#[derive(Default)]
struct Connections {
    next: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
    answering: usize,
}

impl Connections {
    /// Makes room for a new connection (closing the oldest one still waiting for its
    /// request, if the table is full); its id and the signal that closes it, or `None`
    /// if every open connection is being answered.
    fn admit(&mut self) -> Option<(u64, oneshot::Receiver<()>)> {
        if self.waiting.len() + self.answering >= MAX_CONNECTIONS {
            let (_, close) = self.waiting.pop_front()?;
            let _ = close.send(());
        }
        let id = self.next;
        self.next += 1;
        let (close, closed) = oneshot::channel();
        self.waiting.push_back((id, close));
        Some((id, closed))
    }

    /// Connection `id` sent its request: it can no longer be closed to make room.
    fn answering(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == id) {
            self.waiting.remove(i);
            self.answering += 1;
        }
    }

    /// Connection `id` is done.
    fn close(&mut self, id: u64) {
        match self.waiting.iter().position(|(w, _)| *w == id) {
            Some(i) => {
                self.waiting.remove(i);
            }
            None => self.answering = self.answering.saturating_sub(1),
        }
    }
}

/// Reads one request (within [`REQUEST_TIMEOUT`], unless `evicted` closes the
/// connection first), tells `answering`, and writes the answer.
async fn exchange(
    stream: UnixStream,
    answer: Answer,
    evicted: oneshot::Receiver<()>,
    answering: impl FnOnce(),
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
    let request = tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line));
    tokio::select! {
        read = request => {
            read.map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
        _ = evicted => return Ok(()),
    }
    answering();
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => answer(request).await,
        Err(e) => error_reply(format!(
            "bad request ({e}); expected one line of JSON, e.g. {{\"command\":\"status\"}}"
        )),
    };
    let mut text = reply.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Answers a terminate request: `end` ends the session of that id and says whether it
/// was live (`who`: "node" or "client", for the answer when it cannot be asked).
pub async fn terminate_answer<F, E>(
    session_id: &str,
    who: &str,
    end: impl FnOnce(SessionId) -> F,
) -> Value
where
    F: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let Ok(id) = session_id.parse::<SessionId>() else {
        return error_reply(format!(
            "{session_id:?} is not a session id (16 hex digits)"
        ));
    };
    match end(id).await {
        Ok(true) => serde_json::json!({ "ok": true, "session_id": session_id }),
        Ok(false) => error_reply(format!("no live session {session_id}")),
        Err(e) => error_reply(format!("the {who} does not answer: {e}")),
    }
}

/// An answer saying what went wrong.
pub fn error_reply(problem: String) -> Value {
    serde_json::json!({ "ok": false, "error": problem })
}

/// Sends `request` to the node at `path` and returns its answer.
pub async fn ask(path: &Path, request: &Request) -> Result<Value, AdminError> {
    let exchange_err = |problem: String| AdminError::Exchange {
        path: path.to_path_buf(),
        problem,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let talk = async {
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(request).map_err(|e| e.to_string())?;
        text.push('\n');
        write
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_ANSWER))
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Value>(&line).map_err(|e| format!("bad answer: {e}"))
    };
    match tokio::time::timeout(CONNECTION_TIMEOUT, talk).await {
        Ok(r) => r.map_err(exchange_err),
        Err(_) => Err(exchange_err("no answer in time".into())),
    }
}

/// [`ask`], from synchronous code (the commands, the lab): on a runtime of its own.
pub fn ask_blocking(path: &Path, request: &Request) -> Result<Value, AdminError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::Exchange {
            path: path.to_path_buf(),
            problem: format!("cannot start a runtime: {e}"),
        })?;
    runtime.block_on(ask(path, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 idle connections (the finding of issue 13) cannot lock the socket up: a real
    /// request still gets its answer.
    #[test]
    fn idle_connections_cannot_keep_status_from_answering() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("admin.sock");
        actix_rt::System::new().block_on(async {
            let answer: Answer =
                Rc::new(|_| Box::pin(async { serde_json::json!({ "ok": true, "status": 1 }) }));
            let _socket = serve(&path, answer).await.expect("serve");
            let mut idle = Vec::new();
            for _ in 0..300 {
                idle.push(UnixStream::connect(&path).await.expect("connect"));
            }
            // Let the server accept them all.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let answered = ask(&path, &Request::Status).await.expect("an answer");
            assert_eq!(answered["status"], 1);
            drop(idle);
        });
    }
}
