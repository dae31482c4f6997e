//! jvpn-actors: the runtime that drives the pure core with real sockets, devices and
//! timers. Today it holds the two reporting paths every actor uses: the non-blocking
//! event sink ([`events`]) and the Prometheus metrics ([`telemetry`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod events;
pub mod telemetry;
