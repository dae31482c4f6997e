//! What the gateway and the client both set up: the event sink, metrics, the wall
//! clock events are stamped with, and the wait for Ctrl-C / SIGTERM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jvpn_actors::events::EventSink;
use jvpn_core::event::WallClock;

use crate::config::EventsOut;

/// Runs `main` on a new actix system until it ends, as a task of its own.
///
/// The future a runtime blocks on is polled again whenever any task of its thread is
/// woken (tokio's `LocalSet::run_until`), so a daemon's main loop (a `select!` over
/// signals, status and timers) given to `block_on` directly would be polled once per
/// packet. As a task, it is polled only when something it waits for happens.
pub fn run_system<T: 'static>(
    main: impl std::future::Future<Output = Result<T>> + 'static,
) -> Result<T> {
    actix_rt::System::new().block_on(async move {
        match actix_rt::spawn(main).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!(
                "the main task ended without an outcome: {e}"
            )),
        }
    })
}

/// How many events may wait for the sink before new ones are dropped (and counted).
pub const EVENT_QUEUE: usize = 4096;

/// Starts the event sink writing JSON lines to `out`.
pub fn event_sink(out: &EventsOut) -> Result<EventSink> {
    let writer: Box<dyn Write + Send> = match out {
        EventsOut::Stdout => Box::new(std::io::stdout()),
        // Events name session ids and addresses: a new event file is readable by its
        // owner only.
        EventsOut::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot open the event file {}", path.display()))?,
        ),
    };
    EventSink::start(writer, EVENT_QUEUE).context("cannot start the event writer")
}

/// Stops the event sink (writing what it holds) and reports on standard error if
/// events were lost on the way (`who`: "gateway" or "client").
pub fn close_events(sink: EventSink, who: &str) {
    if let Some(counts) = sink.close() {
        if counts.dropped > 0 || counts.write_failures > 0 {
            eprintln!(
                "jvpn {who}: events dropped: {}, event write failures: {}",
                counts.dropped, counts.write_failures
            );
        }
    }
}

/// Serves metrics on `listen`, if set.
pub fn metrics(listen: Option<std::net::SocketAddr>) -> Result<()> {
    if let Some(listen) = listen {
        jvpn_actors::telemetry::install(listen)?;
    }
    Ok(())
}

/// The wall clock, anchored now.
pub fn wall_clock() -> WallClock {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    WallClock::new(Instant::now(), unix_ms)
}

/// Ctrl-C and SIGTERM, watched from the moment of [`StopSignal::install`]: installed
/// before the process changes anything on the host, so a signal never skips the undo.
pub struct StopSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Starts watching. Must run inside the runtime.
    pub fn install() -> Result<StopSignal> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignal {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// Resolves at the first signal; its name.
    pub async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Tells the service manager how the service is (systemd's `sd_notify` protocol: one
/// datagram of `KEY=value` lines to the socket named by `NOTIFY_SOCKET`, a path or, with
/// a leading `@`, an abstract name). Nothing when not started by one; a failure is
/// reported once on standard error and never stops the service.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&target, state) {
        static TOLD: std::sync::Once = std::sync::Once::new();
        TOLD.call_once(|| eprintln!("jvpn: cannot notify the service manager: {e}"));
    }
}

fn send_notify(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// The `MONOTONIC_USEC` a `RELOADING=1` notification carries: CLOCK_MONOTONIC now.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// SIGHUP: reload the configuration.
pub struct ReloadSignal(tokio::signal::unix::Signal);

impl ReloadSignal {
    /// Starts watching. Must run inside the runtime.
    pub fn install() -> Result<ReloadSignal> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ReloadSignal(
            signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        ))
    }

    /// Resolves at the next SIGHUP.
    pub async fn wait(&mut self) {
        self.0.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_event_file_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("events.jsonl");
        let sink = event_sink(&EventsOut::File(path.clone())).expect("sink");
        close_events(sink, "test");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
}
