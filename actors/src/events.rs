//! The event sink: every event as one JSON line, through slog, behind a bounded queue.
//!
//! A state transition must never wait for its event to be written, and must not fail
//! because the sink did. So [`EventSink::emit`] only tries to enqueue (never blocks); a
//! full queue drops the event and counts it (`jvpn_events_dropped_total`), and the
//! writer thread counts every write that fails (`jvpn_event_write_failures_total`) and
//! carries on. The JSON shape is exactly the contract's (spec/events.md): the record's
//! fields become slog key-values, serialized by slog-json with no keys of its own.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use jvpn_core::event::EventRecord;
use serde_json::Value;
use slog::{Drain, Never, OwnedKVList, Record};

/// Counters of what happened to emitted events.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Set by [`EventSink::close`]: senders stop enqueueing, the writer drains and ends.
    closed: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    write_failures: AtomicU64,
}

/// A snapshot of [`SinkStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkCounts {
    /// Events handed to the sink's writer successfully.
    pub written: u64,
    /// Events refused because the queue was full (or the writer gone).
    pub dropped: u64,
    /// Events the writer failed to write (a dead or full disk, a closed pipe).
    pub write_failures: u64,
}

impl SinkStats {
    /// The counts now.
    pub fn counts(&self) -> SinkCounts {
        SinkCounts {
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
        }
    }
}

/// What the writer's queue carries.
#[derive(Debug)]
enum Queued {
    Event(EventRecord),
    /// Sent by [`EventSink::close`]: write what is still queued, then end. The writer
    /// blocks on its queue until then, and wakes for nothing else.
    Close,
}

/// The sending side of the event stream; cheap to clone, one per producer.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: SyncSender<Queued>,
    stats: Arc<SinkStats>,
}

impl EventSender {
    /// Hands `record` to the writer without waiting: if the queue is full (or the
    /// writer has stopped) the event is dropped and counted, and the caller goes on.
    pub fn emit(&self, record: EventRecord) {
        if self.stats.closed.load(Ordering::Acquire) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("jvpn_events_dropped_total").increment(1);
            return;
        }
        match self.tx.try_send(Queued::Event(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("jvpn_events_dropped_total").increment(1);
            }
        }
    }

    /// The sink's counters.
    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.stats
    }
}

/// The writer thread and the queue in front of it.
pub struct EventSink {
    sender: Option<EventSender>,
    worker: Option<JoinHandle<()>>,
}

impl EventSink {
    /// Starts the writer thread, writing one JSON line per event to `out`; the queue
    /// holds at most `capacity` events.
    pub fn start(out: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<EventSink> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let stats = Arc::new(SinkStats::default());
        let worker_stats = Arc::clone(&stats);
        let worker = std::thread::Builder::new()
            .name("jvpn-events".into())
            .spawn(move || write_events(rx, out, &worker_stats))?;
        Ok(EventSink {
            sender: Some(EventSender { tx, stats }),
            worker: Some(worker),
        })
    }

    /// A sender for a producer.
    pub fn sender(&self) -> Option<EventSender> {
        self.sender.clone()
    }

    /// Stops accepting events, lets the writer drain what is queued, and waits for it.
    /// Producers still holding a sender see their later events counted as dropped.
    pub fn close(mut self) -> Option<SinkCounts> {
        let EventSender { tx, stats } = self.sender.take()?;
        stats.closed.store(true, Ordering::Release);
        // Waits for room if the queue is full (the writer is draining it); fails only if
        // the writer has already ended.
        let _ = tx.send(Queued::Close);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        Some(stats.counts())
    }
}

fn write_events(rx: Receiver<Queued>, out: Box<dyn Write + Send>, stats: &SinkStats) {
    let json = slog_json::Json::new(out)
        .set_newlines(true)
        .set_flush(true)
        .build();
    let drain = CountingDrain {
        inner: Mutex::new(json),
        stats,
    };
    static RECORD: slog::RecordStatic<'static> = slog::record_static!(slog::Level::Info, "");
    let write = |event: EventRecord| {
        let fields = EventFields::of(&event);
        drain
            .log(
                &Record::new(&RECORD, &format_args!(""), slog::BorrowedKV(&fields)),
                &OwnedKVList::from(slog::o!()),
            )
            .unwrap_or_else(|never| match never {});
    };
    // Producers may still hold senders when the sink closes (the channel then never
    // disconnects): the close is a message of its own.
    while let Ok(Queued::Event(event)) = rx.recv() {
        write(event);
    }
    // Events a producer queued just before it saw the close.
    while let Ok(Queued::Event(event)) = rx.try_recv() {
        write(event);
    }
}

/// Counts successes and failures of the drain it wraps, and never fails itself: a dead
/// sink must not stop the writer.
struct CountingDrain<'s, D> {
    inner: D,
    stats: &'s SinkStats,
}

impl<D: Drain> Drain for CountingDrain<'_, D> {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), Never> {
        match self.inner.log(record, values) {
            Ok(_) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("jvpn_event_write_failures_total").increment(1);
            }
        }
        Ok(())
    }
}

/// An event's JSON fields as slog key-values, in the record's own field order.
struct EventFields(Vec<(String, Value)>);

impl EventFields {
    fn of(event: &EventRecord) -> EventFields {
        match serde_json::to_value(event) {
            Ok(Value::Object(map)) => EventFields(map.into_iter().collect()),
            // An EventRecord always serializes to an object; report the impossible
            // rather than lose the event silently.
            _ => EventFields(vec![(
                "serialization_error".into(),
                Value::String(event.body.event_type().into()),
            )]),
        }
    }
}

impl slog::KV for EventFields {
    fn serialize(&self, _: &Record<'_>, s: &mut dyn slog::Serializer) -> slog::Result {
        // slog serializes key-values last-first; going backwards keeps the record's order.
        for (key, value) in self.0.iter().rev() {
            let key = slog::Key::from(key.clone());
            match value {
                Value::String(v) => s.emit_str(key, v)?,
                Value::Bool(v) => s.emit_bool(key, *v)?,
                Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                    (Some(v), _, _) => s.emit_u64(key, v)?,
                    (None, Some(v), _) => s.emit_i64(key, v)?,
                    (None, None, Some(v)) => s.emit_f64(key, v)?,
                    (None, None, None) => s.emit_none(key)?,
                },
                Value::Null => s.emit_none(key)?,
                nested @ (Value::Object(_) | Value::Array(_)) => {
                    s.emit_serde(key, &slog::Serde(nested.clone()))?
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jvpn_core::event::{EventBody, SessionEvent, TransportRef, WallClock};
    use jvpn_core::fsm::State;
    use jvpn_core::ids::{NodeId, Protocol, SessionId, StateVersion, TransportId};
    use jvpn_core::reason::ReasonCode;
    use std::io;
    use std::time::{Duration, Instant};

    fn record(n: u64) -> EventRecord {
        let t0 = Instant::now();
        EventRecord::new(
            &WallClock::new(t0, 1_000),
            SessionId(0xab),
            NodeId("gw-1".into()),
            "1.0".into(),
            SessionEvent {
                at: t0,
                body: EventBody::SessionStateChange {
                    previous_state: State::Attached,
                    new_state: State::Volatile,
                    reason_code: ReasonCode::HeartbeatTimeout,
                    state_version: StateVersion(n),
                },
            },
        )
    }

    /// A writer shared with the test.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that is gone: every write fails.
    struct Dead;

    impl Write for Dead {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "sink is gone"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "sink is gone"))
        }
    }

    /// A sink that blocks until released, to fill the queue.
    struct Stuck(Arc<Mutex<()>>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _held = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_event_is_one_json_line_in_the_contract_shape() {
        let out = Shared::default();
        let sink = EventSink::start(Box::new(out.clone()), 16).expect("start");
        let tx = sink.sender().expect("sender");
        tx.emit(record(1));
        let mut switch = record(2);
        let t = TransportRef {
            id: TransportId(2),
            protocol: Protocol::Udp,
        };
        switch.body = EventBody::TransportSwitch {
            previous_transport: None,
            new_transport: t,
            candidate_count: 2,
            loss_ratio: 0.25,
            latency_estimate_ms: None,
            explicit: true,
        };
        tx.emit(switch.clone());
        drop(tx);
        let counts = sink.close().expect("counts");
        assert_eq!(counts.written, 2);
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], serde_json::to_value(record(1)).expect("json"));
        assert_eq!(lines[1], serde_json::to_value(switch).expect("json"));
        assert_eq!(lines[1]["new_transport"]["protocol"], "udp");
    }

    #[test]
    fn a_dead_sink_never_blocks_or_fails_the_producer() {
        let sink = EventSink::start(Box::new(Dead), 1_024).expect("start");
        let tx = sink.sender().expect("sender");
        let started = Instant::now();
        for n in 0..500 {
            tx.emit(record(n));
        }
        let emitting = started.elapsed();
        drop(tx);
        let counts = sink.close().expect("counts");
        assert_eq!(counts.written, 0);
        assert_eq!(counts.write_failures + counts.dropped, 500);
        assert_eq!(counts.dropped, 0, "the queue was large enough");
        // Not a timing assertion on speed: only that emit did not wait on the dead
        // writer for anything like a timeout.
        assert!(emitting < Duration::from_secs(5));
    }

    #[test]
    fn close_returns_while_producers_still_hold_senders() {
        let out = Shared::default();
        let sink = EventSink::start(Box::new(out.clone()), 16).expect("start");
        let still_held = sink.sender().expect("sender");
        still_held.emit(record(1));
        let counts = sink.close().expect("close returned");
        assert_eq!(counts.written, 1, "what was queued before close is written");
        still_held.emit(record(2));
        assert_eq!(
            still_held.stats().counts().dropped,
            1,
            "after close: dropped, counted"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("lock");
        let sink = EventSink::start(Box::new(Stuck(Arc::clone(&gate))), 4).expect("start");
        let tx = sink.sender().expect("sender");
        for n in 0..100 {
            tx.emit(record(n));
        }
        let counts = tx.stats().counts();
        // The writer holds at most one event; the queue four.
        assert!(counts.dropped >= 95, "{counts:?}");
        drop(held);
        drop(tx);
        let counts = sink.close().expect("counts");
        assert_eq!(counts.written + counts.dropped, 100);
    }
}
