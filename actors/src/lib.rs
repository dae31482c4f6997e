//! jvpn-actors: the actix runtime that drives the pure core with real sockets, a TUN
//! device and real timers.
//!
//! - [`session::SessionActor`]: one per gateway session; its mailbox serializes every
//!   mutation of the session.
//! - [`transport::UdpTransport`]: one per socket; moves datagrams and reports path
//!   signals, never decides policy.
//! - [`tun::TunActor`]: reads a queue of the gateway's TUN device for the router.
//! - [`supervisor::NodeSupervisor`]: answers handshakes, starts sessions on the per-core
//!   arbiters, restarts or explicitly ends sessions whose actors stop.
//! - [`agent::ClientAgent`]: the client's session, its candidate transports, and its TUN
//!   device, which it reads itself.
//! - [`events`] and [`telemetry`]: the non-blocking event sink and the metrics.

// Denied everywhere but in `sys`, the few system calls no safe wrapper offers, and in
// `read_slot`, a read buffer made whole again without being written.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cluster;
pub mod conn;
pub mod events;
pub mod node;
mod read_slot;
pub mod runtime;
pub mod session;
pub mod supervisor;
mod sys;
pub mod telemetry;
pub mod tls;
pub mod too_big;
pub mod transport;
pub mod tun;

pub use sys::send_frame;
