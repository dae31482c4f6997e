//! jvpn-core: the Jumping VPN protocol as pure, deterministic code.
//!
//! Nothing in this crate opens a socket, spawns a task or reads a clock: every input
//! carries the monotonic `now` the driver read, and every decision comes back as a value
//! (events to log, actions to perform, the next deadline to sleep until). The actor
//! runtime (`jvpn-actors`) is a thin shell over it, and every rule of the contract in
//! spec/ is testable here on a virtual clock.
//!
//! - [`fsm`]: states, events, the transition table, `state_version`.
//! - [`policy`]: the policy schema, validated once into a [`policy::Policy`].
//! - [`health`]: per-transport loss, drops, heartbeat age and RTT, in fixed memory.
//! - [`select`]: candidate filter, ranking, hysteresis, and the switch budget.
//! - [`control`]: one session's control plane composing the above with every timer.
//! - [`journal`]: a state machine with its event queue: no mutation without its event.
//! - [`replay`]: the sliding anti-replay window.
//! - [`store`]: the session table contract and its in-memory implementation.
//! - [`event`]: the event types and their JSON-lines form.
//! - [`wire`]: every packet on the wire, encoded and decoded without panics.
//! - [`crypto`]: Noise IK handshakes and the per-epoch keys that seal session packets.
//! - [`mac`]: the cheap MAC gate in front of every handshake.
//! - [`gateway`]: the gateway side: handshakes, routing, reattach validation, per-session timers.
//! - [`client`]: the client side: handshake, data, heartbeats and probes, reattach, rekey.
//! - [`sim`]: a deterministic simulated network that drives a session on a virtual clock.
//! - [`offload`]: the TUN device's virtio-net header and the split of TCP super-packets.
//! - [`icmp`]: ICMP "too big" answers for tunnel packets the path cannot carry.
//! - [`bucket`]: a token bucket on the monotonic clock.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bucket;
pub mod client;
pub mod cluster;
pub mod control;
pub mod crypto;
pub mod event;
pub mod fsm;
pub mod gateway;
pub mod health;
pub mod icmp;
pub mod ids;
pub mod journal;
mod keycache;
pub mod mac;
mod noise_suite;
pub mod offload;
pub mod pmtu;
pub mod policy;
pub mod reason;
pub mod replay;
pub mod select;
pub mod sim;
pub mod store;
pub mod wire;
mod x25519;
